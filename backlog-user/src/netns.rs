//! Network namespaces named the ways operators name them.
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Resolves `ip netns` names, /proc/PID/ns/net style paths, and bare inode numbers
/// to the namespace inode the kernel reports (`ns.inum`).
pub fn parse_netns(s: &str) -> Result<u32, String> {
    if let Ok(ino) = s.parse::<u32>() {
        return Ok(ino);
    }
    let candidates = if s.contains('/') {
        vec![s.to_string()]
    } else {
        vec![format!("/run/netns/{s}"), format!("/var/run/netns/{s}")]
    };
    for c in &candidates {
        if let Ok(md) = std::fs::metadata(Path::new(c)) {
            return u32::try_from(md.ino()).map_err(|_| format!("{c}: not a namespace file"));
        }
    }
    Err(format!("no network namespace '{s}' (not in `ip netns list`, not a path, not an inode number)"))
}

/// The inode of the namespace this process runs in.
pub fn current() -> std::io::Result<u32> {
    Ok(std::fs::metadata("/proc/self/ns/net")?.ino() as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_paths_and_numbers() {
        assert_eq!(super::parse_netns("4026531840").unwrap(), 4026531840);
        let me = super::current().unwrap();
        assert_eq!(super::parse_netns("/proc/self/ns/net").unwrap(), me);
        assert!(super::parse_netns("surely-no-such-netns").is_err());
    }
}
