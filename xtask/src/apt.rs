//! A private apt configuration under target/vm/apt: its own sources, lists, cache and an
//! empty dpkg status, so kernels can be resolved and downloaded from suites the machine
//! does not use (sid, trixie-backports) without touching /etc/apt or /var/lib/apt.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Suites that carry the kernels the machine's own suites (bookworm*: 6.1, 6.12) lack:
/// 5.10 (bullseye) and 7.x (trixie-backports, sid).
const EXTRA_SUITES: &[&str] = &["bullseye", "trixie-backports", "sid"];
/// The same on the mirror that serves the machine's -security suite: 5.10's newest
/// builds (bullseye LTS) are only there.
const EXTRA_SECURITY_SUITES: &[&str] = &["bullseye-security"];
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub struct Apt {
    dir: PathBuf,
}

/// One apt source entry, whichever of the two file formats it came from.
struct Source {
    uri: String,
    suites: Vec<String>,
    components: String,
    signed_by: Option<String>,
}

impl Apt {
    pub fn new(dir: PathBuf) -> Self {
        Apt { dir }
    }

    /// Writes the private sources (the machine's Debian entries plus EXTRA_SUITES on the
    /// same mirror: only that mirror is reachable, and no host name is hard-coded here)
    /// and downloads the package lists.
    pub fn update(&self) -> Result<()> {
        let text = sources(EXTRA_SUITES, EXTRA_SECURITY_SUITES)?;
        for sub in ["sources.list.d", "lists/partial", "cache", "archives/partial"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        fs::write(self.dir.join("sources.list.d/kernels.sources"), text)?;
        fs::write(self.dir.join("status"), "")?;
        let out = self.cmd("apt-get").args(["update", "-q"]).output().context("running apt-get")?;
        if !out.status.success() {
            bail!(
                "apt-get update (private config in {}) failed: {}\nfix: check network access to the Debian mirror",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Names of real (downloadable) packages matching an extended regex.
    pub fn search_names(&self, regex: &str) -> Result<Vec<String>> {
        let out = self.cmd("apt-cache").args(["search", "--names-only", regex]).output()?;
        if !out.status.success() {
            bail!("apt-cache search failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(" - ").next())
            .map(str::to_owned)
            .collect())
    }

    /// Downloads the newest version of each package into `dest` (no install).
    pub fn download(&self, packages: &[String], dest: &Path) -> Result<()> {
        fs::create_dir_all(dest)?;
        let out = self.cmd("apt-get").arg("download").args(packages).current_dir(dest).output()?;
        if !out.status.success() {
            bail!(
                "apt-get download {} failed: {}\nfix: the package lists may be stale: rerun with --refresh",
                packages.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn cmd(&self, program: &str) -> Command {
        let d = self.dir.display();
        let mut c = Command::new(program);
        for opt in [
            "Dir::Etc::SourceList=/dev/null".to_owned(),
            format!("Dir::Etc::SourceParts={d}/sources.list.d"),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::State::Status={d}/status"),
            format!("Dir::Cache={d}/cache"),
            format!("Dir::Cache::Archives={d}/archives"),
            // apt's _apt user cannot write into target/ (owned by whoever builds).
            "APT::Sandbox::User=root".to_owned(),
        ] {
            c.args(["-o", &opt]);
        }
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    }
}

/// Private apt sources in deb822 form: the machine's Debian entries, plus `extra` suites
/// on the mirror that serves the machine's codename and `extra_security` ones on the
/// mirror that serves its -security suite (a name may say `{codename}`).
fn sources(extra: &[&str], extra_security: &[&str]) -> Result<String> {
    let codename = codename()?;
    let system = system_sources()?;
    let debian: Vec<&Source> = system
        .iter()
        .filter(|s| s.suites.iter().any(|x| x == &codename || x.starts_with(&format!("{codename}-"))))
        .collect();
    let mirror =
        debian.iter().find(|s| s.suites.iter().any(|x| x == &codename)).map(|s| s.uri.clone()).with_context(|| {
            format!("no apt source serves '{codename}': add the Debian mirror to /etc/apt/sources.list.d")
        })?;
    let names =
        |suites: &[&str]| suites.iter().map(|x| x.replace("{codename}", &codename)).collect::<Vec<_>>().join(" ");

    let mut text = String::new();
    for s in &debian {
        text += &stanza(&s.uri, &s.suites.join(" "), &s.components, s.signed_by.as_deref());
    }
    if !extra.is_empty() {
        text += &stanza(&mirror, &names(extra), "main", Some(KEYRING));
    }
    if !extra_security.is_empty() {
        let security = format!("{codename}-security");
        match debian.iter().find(|s| s.suites.contains(&security)) {
            Some(s) => text += &stanza(&s.uri, &names(extra_security), "main", Some(KEYRING)),
            None => {
                eprintln!("vm: no apt source serves '{security}': 5.10 comes from bullseye without its LTS updates")
            }
        }
    }
    Ok(text)
}

/// For installing from the machine's <codename>-backports, which its sources may lack
/// (scripts/vm-deps.sh: qemu): writes `dir`/sources.list.d (the machine's Debian
/// entries plus backports on the same mirror) and returns the apt-get options that use
/// it, with private lists under `dir` and -t backports; /etc/apt, /var/lib/apt/lists
/// and the dpkg status stay the machine's.
pub fn backports_options(dir: &Path) -> Result<Vec<String>> {
    let text = sources(&["{codename}-backports"], &[])?;
    // Only this file: what an earlier version left there would be read too.
    let _ = fs::remove_dir_all(dir.join("sources.list.d"));
    for sub in ["sources.list.d", "lists/partial"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::write(dir.join("sources.list.d/backports.sources"), text)?;
    let d = dir.display();
    Ok(vec![
        "-o".into(),
        "Dir::Etc::SourceList=/dev/null".into(),
        "-o".into(),
        format!("Dir::Etc::SourceParts={d}/sources.list.d"),
        "-o".into(),
        format!("Dir::State::Lists={d}/lists"),
        "-t".into(),
        format!("{}-backports", codename()?),
    ])
}

fn stanza(uri: &str, suites: &str, components: &str, signed_by: Option<&str>) -> String {
    let mut s = format!("Types: deb\nURIs: {uri}\nSuites: {suites}\nComponents: {components}\n");
    if let Some(k) = signed_by {
        s += &format!("Signed-By: {k}\n");
    }
    s + "\n"
}

fn codename() -> Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .context("no VERSION_CODENAME in /etc/os-release")
}

/// The machine's apt sources, from both the deb822 (*.sources) and one-line (*.list) files.
fn system_sources() -> Result<Vec<Source>> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    let mut sources = Vec::new();
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => sources.extend(parse_deb822(&text)),
            Some("list") => sources.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    Ok(sources)
}

fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let field = |name: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_owned())
        };
        let (Some(types), Some(uris), Some(suites)) = (field("Types"), field("URIs"), field("Suites")) else {
            continue;
        };
        if field("Enabled").is_some_and(|e| e == "no") || !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        for uri in uris.split_whitespace() {
            out.push(Source {
                uri: uri.to_owned(),
                suites: suites.split_whitespace().map(str::to_owned).collect(),
                components: field("Components").unwrap_or_else(|| "main".into()),
                signed_by: field("Signed-By"),
            });
        }
    }
    out
}

fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts.split_whitespace().find_map(|o| o.strip_prefix("signed-by=")).map(str::to_owned);
            rest = after.trim();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        let components: Vec<&str> = words.collect();
        out.push(Source {
            uri: uri.to_owned(),
            suites: vec![suite.to_owned()],
            components: if components.is_empty() { "main".into() } else { components.join(" ") },
            signed_by,
        });
    }
    out
}
