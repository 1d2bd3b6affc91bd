//! Reading a recording back: every complete, intact record up to the first damage.
use std::fmt;
use std::io::{self, Read};

use super::format::{self, HeaderError, Record, HEADER_LEN, MAX_PAYLOAD};

/// Where and why reading stopped early. Everything before `offset` was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub reason: &'static str,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stopped at byte {}: {}", self.offset, self.reason)
    }
}

/// The file is not a recording this build can read at all.
#[derive(Debug)]
pub enum OpenError {
    Io(io::Error),
    Header(HeaderError),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Io(e) => write!(f, "{e}"),
            OpenError::Header(HeaderError::Foreign) => {
                write!(f, "not a backlog-trace recording (no BLGTRACE header); give files written by `backlog-trace record`")
            }
            OpenError::Header(HeaderError::Corrupt) => {
                write!(f, "the file header is corrupt (checksum mismatch); the recording cannot be read")
            }
            OpenError::Header(HeaderError::Version(v)) => write!(
                f,
                "recording format version {v}, this backlog-trace reads version {}; use the backlog-trace that wrote it",
                format::VERSION
            ),
            OpenError::Header(HeaderError::EventSize(n)) => write!(
                f,
                "recording of format version {} with {n}-byte events, this backlog-trace's events are {} bytes; \
                 use the backlog-trace that wrote it",
                format::VERSION,
                format::EVENT_LEN
            ),
        }
    }
}

pub enum Step {
    Record(Record),
    /// Clean end of file after a complete record.
    Eof,
    Damaged(Damage),
}

pub struct Reader<R> {
    inner: R,
    offset: u64,
    done: bool,
}

/// Fills `buf` as far as the input allows; returns how many bytes it got, so a
/// short count means end of file.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<R: Read> Reader<R> {
    /// Checks the header. A file too short to hold one is a recording torn before
    /// its first byte was complete, not a foreign file: it reads as damaged at 0.
    pub fn new(mut inner: R) -> Result<Reader<R>, OpenError> {
        let mut h = [0u8; HEADER_LEN];
        let got = fill(&mut inner, &mut h).map_err(OpenError::Io)?;
        if got < HEADER_LEN {
            let common = got.min(format::MAGIC.len());
            if h[..common] != format::MAGIC[..common] {
                return Err(OpenError::Header(HeaderError::Foreign));
            }
            return Ok(Reader { inner, offset: 0, done: true });
        }
        format::check_header(&h).map_err(OpenError::Header)?;
        Ok(Reader { inner, offset: HEADER_LEN as u64, done: false })
    }

    pub fn next_step(&mut self) -> Step {
        if self.done {
            return match self.offset {
                0 => Step::Damaged(Damage { offset: 0, reason: "truncated header" }),
                _ => Step::Eof,
            };
        }
        match self.read_one() {
            Ok(Some(rec)) => Step::Record(rec),
            Ok(None) => {
                self.done = true;
                Step::Eof
            }
            Err(reason) => {
                self.done = true;
                Step::Damaged(Damage { offset: self.offset, reason })
            }
        }
    }

    /// The next record of a known kind; unknown kinds are skipped. On error the
    /// offset stays at the start of the bad record.
    fn read_one(&mut self) -> Result<Option<Record>, &'static str> {
        loop {
            let mut head = [0u8; 5];
            match fill(&mut self.inner, &mut head) {
                Ok(0) => return Ok(None),
                Ok(5) => {}
                Ok(_) => return Err("truncated record"),
                Err(_) => return Err("read error"),
            }
            let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
            if len > MAX_PAYLOAD {
                return Err("corrupt record (length beyond the 64 MiB a record can have)");
            }
            // The buffer grows as bytes arrive, never to what the length field
            // claims: a corrupt length in a short file costs what the file holds.
            let want = len as usize + 4;
            let mut framed = Vec::with_capacity(want.min(64 << 10) + 5);
            framed.extend_from_slice(&head);
            match (&mut self.inner).take(want as u64).read_to_end(&mut framed) {
                Ok(n) if n == want => {}
                Ok(_) => return Err("truncated record"),
                Err(_) => return Err("read error"),
            }
            if !format::crc_ok(&framed) {
                return Err("corrupt record (checksum mismatch)");
            }
            let decoded = format::decode(head[0], &framed[5..framed.len() - 4])
                .map_err(|_| "corrupt record (checksum matches, contents do not parse)")?;
            self.offset += framed.len() as u64;
            if let Some(rec) = decoded {
                return Ok(Some(rec));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::alloc_meter;
    use super::super::format::tests::samples;
    use super::super::format::{frame, header};
    use super::*;
    use crate::testing::Rng;

    fn file(records: &[Record]) -> (Vec<u8>, Vec<usize>) {
        let mut out = header().to_vec();
        let mut ends = Vec::new();
        for r in records {
            out.extend_from_slice(&frame(r));
            ends.push(out.len());
        }
        (out, ends)
    }

    /// Reads everything; returns the records and how it ended.
    pub(crate) fn read_all(data: &[u8]) -> Result<(Vec<Record>, Option<Damage>), String> {
        let mut r = Reader::new(data).map_err(|e| e.to_string())?;
        let mut recs = Vec::new();
        loop {
            match r.next_step() {
                Step::Record(rec) => recs.push(rec),
                Step::Eof => return Ok((recs, None)),
                Step::Damaged(d) => return Ok((recs, Some(d))),
            }
        }
    }

    #[test]
    fn reads_back_what_was_written() {
        let recs = samples();
        let (data, _) = file(&recs);
        assert_eq!(read_all(&data).unwrap(), (recs, None));
    }

    #[test]
    fn a_torn_tail_keeps_every_complete_record() {
        let recs = samples();
        let (data, ends) = file(&recs);
        for cut in 0..data.len() {
            let (got, damage) = read_all(&data[..cut]).unwrap();
            let complete = ends.iter().filter(|e| **e <= cut).count();
            assert_eq!(got, recs[..complete], "cut at {cut}");
            let last_end = if complete == 0 { HEADER_LEN } else { ends[complete - 1] };
            if cut < HEADER_LEN {
                assert_eq!(damage, Some(Damage { offset: 0, reason: "truncated header" }));
            } else if cut == last_end {
                assert_eq!(damage, None, "cut at a record boundary is a clean end");
            } else {
                assert_eq!(damage, Some(Damage { offset: last_end as u64, reason: "truncated record" }));
            }
        }
    }

    #[test]
    fn corruption_stops_at_the_damaged_record() {
        let recs = samples();
        let (mut data, ends) = file(&recs);
        data[ends[2] + 7] ^= 1;
        let (got, damage) = read_all(&data).unwrap();
        assert_eq!(got, recs[..3]);
        assert_eq!(
            damage.unwrap().to_string(),
            format!("stopped at byte {}: corrupt record (checksum mismatch)", ends[2])
        );
    }

    #[test]
    fn unknown_kinds_are_skipped() {
        let recs = samples();
        let (mut data, _) = file(&recs[..1]);
        let mut unknown = vec![99u8, 3, 0, 0, 0, b'a', b'b', b'c'];
        let crc = crc32fast::hash(&unknown);
        unknown.extend_from_slice(&crc.to_le_bytes());
        data.extend_from_slice(&unknown);
        data.extend_from_slice(&frame(&recs[6]));
        assert_eq!(read_all(&data).unwrap(), (vec![recs[0].clone(), recs[6].clone()], None));
    }

    #[test]
    fn foreign_and_newer_files_are_refused() {
        let e = read_all(b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00").unwrap_err();
        assert!(e.contains("not a backlog-trace recording"), "{e}");
        assert!(read_all(b"#!/bin").unwrap_err().contains("not a backlog-trace recording"));
        let mut h = header();
        h[8] = 9;
        let crc = crc32fast::hash(&h[..12]);
        h[12..].copy_from_slice(&crc.to_le_bytes());
        let e = read_all(&h).unwrap_err();
        assert!(e.contains("version 9") && e.contains("reads version 2"), "{e}");
        // Same version, other event size: both sizes are named.
        let mut h = header();
        h[10..12].copy_from_slice(&120u16.to_le_bytes());
        let crc = crc32fast::hash(&h[..12]);
        h[12..].copy_from_slice(&crc.to_le_bytes());
        let e = read_all(&h).unwrap_err();
        assert!(e.contains("120-byte events") && e.contains("events are 112 bytes"), "{e}");
        // An empty file is a recording cut before its header, not a foreign file.
        assert_eq!(read_all(b"").unwrap().1.unwrap().offset, 0);
    }

    /// Random mutations of a valid file (bit flips, byte overwrites, cuts,
    /// splices, length fields set to extremes, checksums fixed up so the payload
    /// parser is reached too) never panic the reader, and what it allocates stays
    /// within a small multiple of the file's size: a length or count field says
    /// how much to expect, never how much to allocate.
    #[test]
    fn mutated_files_never_panic_nor_overallocate() {
        let (base, ends) = file(&samples());
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut damaged = 0;
        // A fixed count, not a time budget: reproducible, and light on a shared CPU.
        const RUNS: usize = 12_000;
        for run in 0..RUNS {
            let mut d = base.clone();
            for _ in 0..1 + rng.below(4) {
                match rng.below(7) {
                    0 => {
                        let i = rng.below(d.len());
                        d[i] ^= 1 << rng.below(8);
                    }
                    1 => {
                        let i = rng.below(d.len());
                        d[i] = rng.next() as u8;
                    }
                    2 => d.truncate(rng.below(d.len() + 1)),
                    3 => {
                        let i = rng.below(d.len() + 1);
                        let extra: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
                        d.splice(i..i, extra);
                    }
                    4 => {
                        // A record's length field set to an extreme (up to the
                        // largest the reader accepts), its checksum left as is.
                        let r = rng.below(ends.len());
                        let start = if r == 0 { HEADER_LEN } else { ends[r - 1] };
                        if start + 5 <= d.len() {
                            let len = [MAX_PAYLOAD, MAX_PAYLOAD + 1, u32::MAX, rng.next() as u32][rng.below(4)];
                            d[start + 1..start + 5].copy_from_slice(&len.to_le_bytes());
                        }
                    }
                    5 => {
                        // A list count inside a payload set large, re-checksummed.
                        let r = rng.below(ends.len());
                        let start = if r == 0 { HEADER_LEN } else { ends[r - 1] };
                        if ends[r] <= d.len() && ends[r] - start >= 13 {
                            let i = start + 5 + rng.below(ends[r] - start - 12);
                            let n = [u32::MAX, 1 << 20, rng.next() as u32 >> rng.below(32)][rng.below(3)];
                            d[i..i + 4].copy_from_slice(&n.to_le_bytes());
                            let crc = crc32fast::hash(&d[start..ends[r] - 4]);
                            d[ends[r] - 4..ends[r]].copy_from_slice(&crc.to_le_bytes());
                        }
                    }
                    _ => {
                        // Rewrite a record's payload bytes and re-checksum it.
                        let r = rng.below(ends.len());
                        let start = if r == 0 { HEADER_LEN } else { ends[r - 1] };
                        if ends[r] <= d.len() {
                            let i = start + 5 + rng.below(ends[r] - start - 9);
                            d[i] = rng.next() as u8;
                            let crc = crc32fast::hash(&d[start..ends[r] - 4]);
                            d[ends[r] - 4..ends[r]].copy_from_slice(&crc.to_le_bytes());
                        }
                    }
                }
                if d.is_empty() {
                    break;
                }
            }
            let (got, peak) = alloc_meter::peak_during(|| read_all(&d));
            damaged += usize::from(matches!(got, Ok((_, Some(_))) | Err(_)));
            let bound = 16 * d.len() + (64 << 10);
            assert!(peak <= bound, "run {run}: {peak} bytes allocated reading {} bytes", d.len());
        }
        // The mutations reach the damage paths, and leave some files whole.
        assert!(damaged > RUNS / 2 && damaged < RUNS, "{damaged} of {RUNS} damaged");
    }
}
