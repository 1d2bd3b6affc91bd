//! The user side's layering, checked on its source (issue 13): every module imports
//! only modules below it (no cycle among them, a parent's `mod` counting as an
//! import of the child), only cli/ knows clap, and only event.rs reads an event's
//! kind byte. Test-only modules are left out: they may reach anywhere.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path ("session::owners") -> its source without test-only parts.
fn modules() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(&root).unwrap().with_extension("");
            let mut name = rel.to_str().unwrap().replace('/', "::");
            if let Some(parent) = name.strip_suffix("::mod") {
                name = parent.to_string();
            }
            let src = std::fs::read_to_string(&p).unwrap();
            out.insert(name, strip_tests(&src));
        }
    }
    // Modules declared `#[cfg(test)] mod x;` are tests.
    let test_only: Vec<String> = out
        .iter()
        .flat_map(|(m, src)| {
            let lines: Vec<&str> = src.lines().collect();
            (1..lines.len())
                .filter(|&i| lines[i - 1].trim() == "#[cfg(test)]")
                .filter_map(|i| declared(lines[i]))
                .map(|c| child(m, &c))
                .collect::<Vec<_>>()
        })
        .collect();
    for t in test_only {
        out.remove(&t);
    }
    out
}

/// The source up to its `#[cfg(test)] mod tests {` block, without comment lines.
fn strip_tests(src: &str) -> String {
    let mut kept = String::new();
    let mut prev = "";
    for line in src.lines() {
        if prev.trim() == "#[cfg(test)]" && line.trim_start().contains("mod tests {") {
            break;
        }
        prev = line;
        if line.trim_start().starts_with("//") {
            continue;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    kept
}

/// `mod x;` / `pub mod x;` / `pub(crate) mod x;` -> x.
fn declared(line: &str) -> Option<String> {
    let t = line.trim();
    let rest = t.strip_prefix("pub(crate) ").or_else(|| t.strip_prefix("pub ")).unwrap_or(t);
    let name = rest.strip_prefix("mod ")?.strip_suffix(';')?;
    Some(name.to_string())
}

fn child(parent: &str, name: &str) -> String {
    if parent == "main" || parent == "lib" {
        name.to_string()
    } else {
        format!("{parent}::{name}")
    }
}

/// The module a path names, resolved from module `cur` (longest known prefix).
fn resolve(mods: &BTreeMap<String, String>, cur: &str, path: &[&str]) -> Option<String> {
    let mut parts: Vec<&str> = match path.first()? {
        &"crate" => path[1..].to_vec(),
        &"self" => cur.split("::").chain(path[1..].iter().copied()).collect(),
        &"super" => {
            let mut base: Vec<&str> = cur.split("::").collect();
            let mut rest = path;
            while rest.first() == Some(&"super") {
                base.pop();
                rest = &rest[1..];
            }
            base.into_iter().chain(rest.iter().copied()).collect()
        }
        _ => return None,
    };
    while !parts.is_empty() {
        let name = parts.join("::");
        if mods.contains_key(&name) {
            return Some(name);
        }
        parts.pop();
    }
    Some("main".into())
}

/// Every `crate::…`, `super::…`, `self::…` path in `src`, braces expanded one level.
fn paths(src: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = src.chars().collect();
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < bytes.len() {
        if !word(bytes[i]) || (i > 0 && (word(bytes[i - 1]) || bytes[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let mut j = i;
        let mut segs = Vec::new();
        loop {
            let start = j;
            while j < bytes.len() && word(bytes[j]) {
                j += 1;
            }
            segs.push(bytes[start..j].iter().collect::<String>());
            if j + 1 < bytes.len() && bytes[j] == ':' && bytes[j + 1] == ':' {
                j += 2;
                if j < bytes.len() && bytes[j] == '{' {
                    let end = (j..bytes.len()).find(|&k| bytes[k] == '}').unwrap_or(bytes.len());
                    let inner: String = bytes[j + 1..end].iter().collect();
                    for item in inner.split(',') {
                        let first = item.trim().split("::").next().unwrap_or("").to_string();
                        let mut p = segs.clone();
                        if !first.is_empty() && first != "self" {
                            p.push(first);
                        }
                        out.push(p);
                    }
                    j = end;
                    segs.clear();
                    break;
                }
                continue;
            }
            break;
        }
        if matches!(segs.first().map(String::as_str), Some("crate" | "super" | "self")) && segs.len() > 1 {
            out.push(segs);
        }
        i = j.max(i + 1);
    }
    out
}

#[test]
fn modules_import_only_downward() {
    let mods = modules();
    assert!(mods.len() > 30, "found only {} modules: is the source where the test looks?", mods.len());
    let mut edges: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (m, src) in &mods {
        let e = edges.entry(m).or_default();
        for p in paths(src) {
            let p: Vec<&str> = p.iter().map(String::as_str).collect();
            if let Some(t) = resolve(&mods, m, &p) {
                if &t != m && mods.contains_key(&t) {
                    e.insert(t);
                }
            }
        }
        for line in src.lines() {
            if let Some(c) = declared(line).map(|c| child(m, &c)) {
                if mods.contains_key(&c) {
                    e.insert(c);
                }
            }
        }
    }
    // A module that reaches itself again through its imports sits on a cycle.
    let mut cycles = Vec::new();
    for start in mods.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<String> = edges[start.as_str()].iter().cloned().collect();
        while let Some(n) = todo.pop() {
            if &n == start {
                cycles.push(start.clone());
                break;
            }
            if seen.insert(n.clone()) {
                todo.extend(edges[n.as_str()].iter().cloned());
            }
        }
    }
    assert!(cycles.is_empty(), "modules on an import cycle: {cycles:?}\nimports: {edges:#?}");
}

#[test]
fn only_cli_knows_clap_and_only_event_reads_a_kind_byte() {
    for (m, src) in modules() {
        if m != "cli" && !m.starts_with("cli::") && m != "main" {
            assert!(!src.contains("clap::") && !src.contains("use clap"), "{m} uses clap");
        }
        if m != "event" {
            assert!(!src.contains("EventKind") && !src.contains("from_u8("), "{m} reads an event's kind byte");
        }
    }
}
