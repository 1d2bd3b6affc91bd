//! Pulls the ELF vmlinux out of an x86 bzImage. qemu boots an ELF with a PVH note
//! directly, skipping the in-guest decompression that takes seconds under TCG.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

pub fn extract(bzimage: &Path, out: &Path) -> Result<()> {
    let image = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let payload = payload(&image).with_context(|| format!("{} is not an x86 bzImage", bzimage.display()))?;
    let (tool, args): (&str, &[&str]) = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => ("xz", &["-dc", "--single-stream"]),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => ("zstd", &["-dcq"]),
        [0x1f, 0x8b, ..] => ("gzip", &["-dc"]),
        // The legacy LZ4 frame: Debian's -cloud kernels.
        [0x02, 0x21, 0x4c, 0x18, ..] => ("lz4", &["-dcq"]),
        _ => bail!("{}: unsupported kernel compression (magic {:02x?})", bzimage.display(), &payload[..4]),
    };
    let elf = decompress(tool, args, payload)?;
    if !elf.starts_with(b"\x7fELF") {
        bail!("{}: decompressed payload is not an ELF vmlinux", bzimage.display());
    }
    fs::write(out, elf).with_context(|| format!("writing {}", out.display()))
}

/// The compressed kernel inside a bzImage, located by the boot protocol header
/// (setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c, protocol >= 2.08).
fn payload(image: &[u8]) -> Option<&[u8]> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let u32_at = |o: usize| Some(u32::from_le_bytes(image.get(o..o + 4)?.try_into().ok()?) as usize);
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let payload = image.get(start..start + u32_at(0x24c)?)?;
    // The build appends the uncompressed size (4 bytes), which decompressors reject.
    payload.get(..payload.len().checked_sub(4)?)
}

fn decompress(tool: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{tool} not found: apt-get install {tool}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    // Feed stdin from a thread: the output is larger than a pipe buffer.
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    if !out.status.success() {
        bail!("{tool} failed on the kernel payload: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}
