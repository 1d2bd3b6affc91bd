//! Which stock Debian kernels to test, and their files under target/vm/kernels/<release>/:
//! `vmlinux` (booted directly as PVH: faster under TCG than the self-decompressing image)
//! and `root/lib/modules/<release>` (all modules, with modules.dep), which the guest
//! bind-mounts so that modprobe and the kernel's module autoloading work inside it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::apt::Apt;
use crate::vmlinux;

/// A kernel line: 5.10 (bullseye), 6.1 (bookworm), 6.12 (bookworm's newer line), 7 (newest 7.x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    V5_10,
    V6_1,
    V6_12,
    V7,
}

const LINES: [(Line, &str); 4] = [(Line::V5_10, "5.10"), (Line::V6_1, "6.1"), (Line::V6_12, "6.12"), (Line::V7, "7")];

impl Line {
    fn contains(self, v: &Version) -> bool {
        match self {
            Line::V5_10 => (v.major, v.minor) == (5, 10),
            Line::V6_1 => (v.major, v.minor) == (6, 1),
            Line::V6_12 => (v.major, v.minor) == (6, 12),
            Line::V7 => v.major == 7,
        }
    }
}

/// Debian's kernel flavours: the release name ends in -amd64, -rt-amd64 or -cloud-amd64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Flavour {
    Generic,
    /// PREEMPT_RT: softirqs run in preemptible threads.
    Rt,
    /// A reduced configuration for cloud VMs (no 9p: the guest mounts the host over
    /// virtiofs; modular virtio).
    Cloud,
}

const FLAVOURS: [(Flavour, &str); 3] = [(Flavour::Generic, ""), (Flavour::Rt, "-rt"), (Flavour::Cloud, "-cloud")];

/// A kernel we test: a line in one flavour, named like `6.12` or `6.12-rt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    line: Line,
    flavour: Flavour,
}

const fn series(line: Line, flavour: Flavour) -> Series {
    Series { line, flavour }
}

impl Series {
    /// What `all` means: every generic line, PREEMPT_RT on its first mainline line
    /// (6.12) and the -cloud flavour on the machine's own line (6.1: bookworm's cloud
    /// images run it; built without 9p, it boots with virtiofs shares, see initramfs.rs).
    pub const ALL: [Series; 6] = [
        series(Line::V5_10, Flavour::Generic),
        series(Line::V6_1, Flavour::Generic),
        series(Line::V6_12, Flavour::Generic),
        series(Line::V7, Flavour::Generic),
        series(Line::V6_12, Flavour::Rt),
        series(Line::V6_1, Flavour::Cloud),
    ];

    /// `all`, or a line (5.10, 6.1, 6.12, 7) with an optional -rt or -cloud suffix.
    pub fn parse(s: &str) -> Result<Vec<Series>> {
        if s == "all" {
            return Ok(Series::ALL.to_vec());
        }
        for (flavour, suffix) in FLAVOURS.iter().rev() {
            let Some(line) = s.strip_suffix(suffix) else { continue };
            if let Some((line, _)) = LINES.iter().find(|(_, n)| *n == line) {
                return Ok(vec![series(*line, *flavour)]);
            }
        }
        bail!("unknown kernel '{s}': use 5.10, 6.1, 6.12 or 7, optionally with -rt or -cloud (6.12-rt), or all")
    }

    pub fn name(self) -> String {
        let line = LINES.iter().find(|(l, _)| *l == self.line).map_or("?", |(_, n)| n);
        let flavour = FLAVOURS.iter().find(|(f, _)| *f == self.flavour).map_or("?", |(_, n)| n);
        format!("{line}{flavour}")
    }

    fn contains(self, release: &Release) -> bool {
        release.flavour == self.flavour && self.line.contains(&release.version)
    }
}

/// A release, parsed from its package name: 5.10 and 6.1 name their ABI after the base
/// version (6.1.0-56-amd64), later lines name the upstream version (6.12.117+deb12-amd64);
/// a flavour sits before -amd64 (6.1.0-56-cloud-amd64).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Release {
    version: Version,
    flavour: Flavour,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Version {
    major: u32,
    minor: u32,
    patch: u32,
    abi: u32,
}

fn parse_release(release: &str) -> Option<Release> {
    let base = release.strip_suffix("-amd64")?;
    let (base, flavour) = match (base.strip_suffix("-rt"), base.strip_suffix("-cloud")) {
        (Some(b), _) => (b, Flavour::Rt),
        (_, Some(b)) => (b, Flavour::Cloud),
        _ => (base, Flavour::Generic),
    };
    let (upstream, abi) = match base.split_once('-') {
        Some((u, abi)) => (u, abi.parse().ok()?),
        None => (base.split_once("+deb")?.0, 0),
    };
    let mut it = upstream.split('.').map(|n| n.parse::<u32>());
    let (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch)), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return None;
    };
    Some(Release { version: Version { major, minor, patch, abi }, flavour })
}

/// Kernel package sets: 6.x ship everything in linux-image-R; 7.x split it into
/// linux-binary-R (vmlinuz), linux-base-R (maps, modules.builtin) and linux-modules-R.
const PACKAGE_PREFIXES: &[&str] = &["linux-image-", "linux-binary-", "linux-base-", "linux-modules-"];

pub struct Kernels {
    vm_dir: PathBuf,
    apt: Apt,
}

pub struct Prepared {
    pub vmlinux: PathBuf,
    /// Holds lib/modules/<release>; the guest mounts it over /lib/modules.
    pub modules_root: PathBuf,
}

impl Kernels {
    pub fn new(vm_dir: &Path) -> Self {
        Kernels { vm_dir: vm_dir.to_owned(), apt: Apt::new(vm_dir.join("apt")) }
    }

    /// Release names for the series, from target/vm/kernels.list unless `refresh` or it
    /// lacks one: only then are the package lists fetched (so re-runs stay offline).
    pub fn resolve(&self, series: &[Series], refresh: bool) -> Result<Vec<(Series, String)>> {
        if !refresh {
            if let Some(found) = self.cached(series) {
                return Ok(found);
            }
        }
        eprintln!(
            "vm: resolving kernels (apt-get update on a private config in {})",
            self.vm_dir.join("apt").display()
        );
        self.apt.update()?;
        let names = self.apt.search_names(r"^linux-image-[0-9.]+(-[0-9]+|\+deb[0-9]+)(-rt|-cloud)?-amd64$")?;
        let mut text = String::new();
        let mut wanted = Series::ALL.to_vec();
        wanted.extend(series.iter().filter(|s| !Series::ALL.contains(s)));
        for s in wanted {
            let newest = names
                .iter()
                .filter_map(|n| n.strip_prefix("linux-image-"))
                .filter_map(|r| parse_release(r).map(|v| (v, r)))
                .filter(|(v, _)| s.contains(v))
                .max();
            match newest {
                Some((_, r)) => text += &format!("{} {r}\n", s.name()),
                None => eprintln!("vm: no {} kernel in the archive", s.name()),
            }
        }
        fs::create_dir_all(&self.vm_dir)?;
        fs::write(self.vm_dir.join("kernels.list"), &text)?;
        series
            .iter()
            .map(|s| {
                lookup(&text, *s).map(|r| (*s, r)).with_context(|| format!("no {} kernel in the archive", s.name()))
            })
            .collect()
    }

    /// The releases recorded by an earlier resolution, if it covered all of `series`.
    pub fn cached(&self, series: &[Series]) -> Option<Vec<(Series, String)>> {
        let text = fs::read_to_string(self.vm_dir.join("kernels.list")).ok()?;
        series.iter().map(|s| lookup(&text, *s).map(|r| (*s, r))).collect()
    }

    /// Downloads and unpacks a release once; later calls only check the `ready` marker.
    pub fn prepare(&self, release: &str) -> Result<Prepared> {
        let dir = self.vm_dir.join("kernels").join(release);
        let prepared = Prepared { vmlinux: dir.join("vmlinux"), modules_root: dir.join("root") };
        if dir.join("ready").exists() {
            return Ok(prepared);
        }
        // A half-done earlier attempt (interrupted) is simply redone.
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing stale {}", dir.display()))?;
        }
        let debs = dir.join("debs");
        let extract = dir.join("extract");
        let available = self.apt.search_names(&format!(
            "^linux-(image|binary|base|modules)-{}$",
            release.replace('.', r"\.").replace('+', r"\+")
        ))?;
        let packages: Vec<String> =
            PACKAGE_PREFIXES.iter().map(|p| format!("{p}{release}")).filter(|p| available.contains(p)).collect();
        if packages.is_empty() {
            bail!("kernel {release} left the archive: rerun with --refresh to pick the current one");
        }
        eprintln!("vm: downloading {}", packages.join(" "));
        self.apt.download(&packages, &debs)?;
        for deb in fs::read_dir(&debs)? {
            let deb = deb?.path();
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(&extract))?;
        }

        // Debian moved /lib to /usr/lib and, for 7.x, vmlinuz into the modules dir.
        let find = |candidates: &[String]| candidates.iter().map(|c| extract.join(c)).find(|p| p.exists());
        let vmlinuz = find(&[format!("boot/vmlinuz-{release}"), format!("usr/lib/modules/{release}/vmlinuz")])
            .with_context(|| format!("no vmlinuz in the packages of {release}"))?;
        let modules = find(&[format!("lib/modules/{release}"), format!("usr/lib/modules/{release}")])
            .with_context(|| format!("no modules dir in the packages of {release}"))?;

        eprintln!("vm: extracting vmlinux from {}", vmlinuz.display());
        vmlinux::extract(&vmlinuz, &prepared.vmlinux)?;
        let target = prepared.modules_root.join("lib/modules").join(release);
        fs::create_dir_all(target.parent().unwrap())?;
        fs::rename(&modules, &target)?;
        // Leave only modules in the tree the guest sees as /lib/modules/<release>.
        let _ = fs::remove_file(target.join("vmlinuz"));
        // The packages ship no modules.dep (their postinst makes it at install time).
        run(Command::new("depmod").arg("-b").arg(&prepared.modules_root).arg(release))
            .context("depmod failed (is kmod installed? run scripts/vm-deps.sh)")?;
        fs::remove_dir_all(&extract)?;
        fs::remove_dir_all(&debs)?;
        fs::write(dir.join("ready"), "")?;
        Ok(prepared)
    }
}

fn lookup(list: &str, s: Series) -> Option<String> {
    let name = s.name();
    list.lines().find_map(|l| l.strip_prefix(&name).and_then(|r| r.strip_prefix(' '))).map(str::to_owned)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32, abi: u32) -> Version {
        Version { major, minor, patch, abi }
    }

    #[test]
    fn parses_both_release_name_styles_and_flavours() {
        let generic = |version| Some(Release { version, flavour: Flavour::Generic });
        assert_eq!(parse_release("6.1.0-56-amd64"), generic(v(6, 1, 0, 56)));
        assert_eq!(parse_release("5.10.0-46-amd64"), generic(v(5, 10, 0, 46)));
        assert_eq!(parse_release("6.12.117+deb12-amd64"), generic(v(6, 12, 117, 0)));
        assert_eq!(
            parse_release("6.1.0-56-cloud-amd64"),
            Some(Release { version: v(6, 1, 0, 56), flavour: Flavour::Cloud })
        );
        assert_eq!(
            parse_release("6.12.117+deb13-rt-amd64"),
            Some(Release { version: v(6, 12, 117, 0), flavour: Flavour::Rt })
        );
        assert_eq!(parse_release("6.1.0-56-amd64-unsigned"), None);
        assert!(parse_release("7.3.4+deb13-amd64") > parse_release("7.2.13+deb14-amd64"));
    }

    #[test]
    fn series_names_round_trip_and_pick_their_flavour() {
        for s in Series::ALL {
            assert_eq!(Series::parse(&s.name()).unwrap(), vec![s]);
        }
        let rt = Series::parse("6.12-rt").unwrap()[0];
        assert!(rt.contains(&parse_release("6.12.117+deb13-rt-amd64").unwrap()));
        assert!(!rt.contains(&parse_release("6.12.117+deb13-amd64").unwrap()));
        assert!(!rt.contains(&parse_release("6.1.0-56-rt-amd64").unwrap()));
        assert_eq!(Series::parse("5.10-cloud").unwrap()[0].name(), "5.10-cloud");
        assert_eq!(Series::parse("6.1-cloud").unwrap()[0].name(), "6.1-cloud");
        assert!(Series::parse("6.12-foo").is_err());
        assert!(Series::parse("4.19").is_err());
    }

    #[test]
    fn lookup_tells_a_line_from_its_flavours() {
        let list = "6.1 6.1.0-56-amd64\n6.1-cloud 6.1.0-56-cloud-amd64\n6.12 6.12.117+deb13-amd64\n";
        let get = |n: &str| lookup(list, Series::parse(n).unwrap()[0]);
        assert_eq!(get("6.1").as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(get("6.1-cloud").as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(get("6.12").as_deref(), Some("6.12.117+deb13-amd64"));
        assert_eq!(get("6.12-rt"), None);
    }
}
