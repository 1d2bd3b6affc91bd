//! Issue 11: the command-line parser over 10,000+ generated argument lists (a
//! seeded generator, so a failure reproduces): it never panics, turning every
//! list into settings or into an error that renders, and allocates no more than
//! a bounded multiple of what it was given.
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use clap::Parser;

use super::{Cli, Command};
use crate::record::alloc_meter::peak_during;
use crate::testing::Rng;

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "check", "record", "report", "help", "--port", "-p", "--pid", "--netns", "--top", "--interval", "-i", "--events",
    "--duration", "-d", "--json", "--hist", "--mode", "--prometheus", "--output", "-o", "--max-size", "--rotate",
    "--since", "--until", "--sample", "--help", "-h", "--version", "-V", "--", "-", "", "=", "--port=", "--top=-1",
    "fentry", "kprobe", "tracepoint", "0", "1", "80", "65535", "65536", "-1", "4294967295", "4294967296",
    "18446744073709551616", "99999999999999999999999", "1e3", "0x10", "30", "30s", "5m", "2h", "1d", "500ms", "0s",
    "-5s", "1.5s", "NaNs", "@1763773323", "@-1", "@99999999999999999999", "2026-11-22T01:02:03Z",
    "2026-13-40T25:61:61Z", "9999-12-31T23:59:59Z", "0000-00-00T00:00:00Z", "4096", "500K", "64M", "1G", "1GiB",
    "99999999999G", "2mb", "9464", "0.0.0.0:9464", "[::1]:9464", "[::1", "/proc/self/ns/net", "/nonexistent/x",
    "blue", "rec.btr", "/tmp", "é", "\u{202e}", "%n%s",
];

/// One argument: a word, a word with bytes changed (invalid UTF-8 included), or
/// random bytes.
fn arg(rng: &mut Rng) -> OsString {
    let word = WORDS[rng.below(WORDS.len())].as_bytes().to_vec();
    let bytes = match rng.below(8) {
        0 => (0..rng.below(24)).map(|_| rng.next() as u8).collect(),
        1 | 2 => {
            let mut w = word;
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(w.len() + 1);
                match rng.below(3) {
                    0 if i < w.len() => w[i] = rng.next() as u8,
                    1 if i < w.len() => {
                        w.remove(i);
                    }
                    _ => w.insert(i, rng.next() as u8),
                }
            }
            w
        }
        3 => {
            // A flag glued to a value.
            let v = WORDS[rng.below(WORDS.len())];
            format!("{}={v}", String::from_utf8_lossy(&word)).into_bytes()
        }
        _ => word,
    };
    OsString::from_vec(bytes)
}

/// Parses `args` as the binary does, and turns what parsed into settings.
fn parse(args: &[OsString]) -> usize {
    match Cli::try_parse_from(args) {
        Ok(cli) => {
            match &cli.command {
                Some(Command::Check(a)) => {
                    let _ = a.settings();
                }
                Some(Command::Record(a)) => {
                    let _ = a.settings();
                    let _ = a.trace.live();
                }
                Some(Command::Report(a)) => {
                    let _ = a.settings();
                }
                // Nothing to turn into settings: they print what the definitions are.
                Some(Command::Completions { .. } | Command::Man { .. }) => {}
                None => {
                    let _ = cli.trace.live();
                }
            }
            0
        }
        Err(e) => e.render().to_string().len(),
    }
}

#[test]
fn generated_command_lines_never_panic_and_allocate_in_bounds() {
    let mut rng = Rng(0x11c1_f022_0000_0011);
    // What parsing costs with nothing to parse: building clap's command tree.
    let (_, floor) = peak_during(|| parse(&["backlog-trace".into(), "--help".into()]));
    let mut errors = 0;
    const RUNS: usize = 12_000;
    for run in 0..RUNS {
        let mut args: Vec<OsString> = vec!["backlog-trace".into()];
        args.extend((0..rng.below(9)).map(|_| arg(&mut rng)));
        let given: usize = args.iter().map(|a| a.len()).sum();
        let (rendered, peak) = peak_during(|| {
            std::panic::catch_unwind(|| parse(&args)).unwrap_or_else(|_| panic!("run {run}: panicked on {args:?}"))
        });
        errors += usize::from(rendered > 0);
        // Clap's tree, plus a bounded multiple of the arguments and of the message.
        let bound = 3 * floor + 64 * (given + rendered) + (64 << 10);
        assert!(peak <= bound, "run {run}: {peak} bytes allocated for {given} bytes of {args:?} (bound {bound})");
    }
    // The generator reaches both sides: lists that parse and lists that do not.
    assert!(errors > RUNS / 10 && errors < RUNS - RUNS / 20, "{errors} of {RUNS} refused");
}
