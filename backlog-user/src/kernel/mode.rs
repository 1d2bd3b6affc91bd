//! The attach modes: how the kernel side detects drops.
use std::fmt;
use std::str::FromStr;

/// Attach mode for the kernel programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Fentry, Mode::Kprobe, Mode::Tracepoint];

    /// The name on the command line and in the output.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Fentry => "fentry",
            Mode::Kprobe => "kprobe",
            Mode::Tracepoint => "tracepoint",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Mode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
            format!("invalid mode '{s}' (possible values: {})", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Mode::ALL {
            assert_eq!(m.name().parse::<Mode>(), Ok(m));
            assert_eq!(m.to_string(), m.name());
        }
        let e = "uprobe".parse::<Mode>().unwrap_err();
        assert!(e.contains("fentry, kprobe, tracepoint"), "{e}");
    }
}
