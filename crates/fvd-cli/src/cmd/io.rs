//! `fvd io` — run qemu-io style commands on an image.
//!
//! Commands (`-c`, in order, or one per line from standard input):
//! `write [-fqz] [-u] [-P pattern] off len`, `read [-qv] [-P pattern] off len`,
//! `discard [-q] off len`, `flush`, `map`, `alloc off [len]`, `length`,
//! `info`, `aio_write`, `aio_read`, `aio_flush`, `help`. Offsets and lengths
//! accept suffixes (`4k`, `1M`) and hexadecimal (`0x1000`). Each transfer is
//! reported the way qemu-io reports it. The image is flushed and closed
//! cleanly at the end; the exit status is 1 if any command failed.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use fvd_core::Opener;
use fvd_core::{Format, Image, IoBuf, Source};

use crate::common::{at, extents, open, parse_format, require_key};
use crate::size::{io_units, parse_size};

/// Longest single read or write, as in qemu-io.
pub const MAX_REQUEST: u64 = 2_147_483_136;

/// Arguments of `fvd io`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format: fvd (default) or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// Open the image read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// With -r: open without taking the shared lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// A command to run (repeatable); without -c commands are read from stdin.
    #[arg(short = 'c', long = "cmd", value_name = "CMD")]
    pub commands: Vec<String>,
    /// The image.
    pub image: PathBuf,
}

/// Options of one command line, getopt style.
#[derive(Debug, Default)]
struct Parsed {
    flags: Vec<char>,
    values: Vec<(char, String)>,
    rest: Vec<String>,
}

impl Parsed {
    fn has(&self, c: char) -> bool {
        self.flags.contains(&c)
    }
    fn value(&self, c: char) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.as_str())
    }
}

/// Split `args` into options (single letters in `flags`, letters in `valued`
/// taking a value) and operands.
fn getopt(args: &[&str], flags: &str, valued: &str) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        if a == "--" {
            i += 1;
            break;
        }
        if !a.starts_with('-') || a.len() == 1 {
            break;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut k = 0;
        while k < chars.len() {
            let c = chars[k];
            if valued.contains(c) {
                let inline: String = chars[k + 1..].iter().collect();
                let v = if inline.is_empty() {
                    i += 1;
                    args.get(i)
                        .map(|s| s.to_string())
                        .ok_or_else(|| format!("option requires an argument -- '{c}'"))?
                } else {
                    inline
                };
                p.values.push((c, v));
                break;
            } else if flags.contains(c) {
                p.flags.push(c);
            } else {
                return Err(format!("invalid option -- '{c}'"));
            }
            k += 1;
        }
        i += 1;
    }
    p.rest = args[i..].iter().map(|s| s.to_string()).collect();
    Ok(p)
}

/// A pattern byte as qemu-io takes it: decimal, octal (`0…`) or hex (`0x…`).
fn parse_pattern(s: &str) -> Result<u8, String> {
    let bad = || format!("{s} is not a valid pattern byte");
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(h, 16).map_err(|_| bad())?
    } else if s.len() > 1 && s.starts_with('0') {
        u32::from_str_radix(&s[1..], 8).map_err(|_| bad())?
    } else {
        s.parse::<u32>().map_err(|_| bad())?
    };
    u8::try_from(v).map_err(|_| bad())
}

/// `off len` operands.
fn off_len(p: &Parsed, cmd: &str) -> Result<(u64, u64), String> {
    if p.rest.len() != 2 {
        return Err(format!("{cmd}: expected an offset and a length"));
    }
    let off = parse_size(&p.rest[0]).map_err(|e| format!("{cmd}: offset: {e}"))?;
    let len = parse_size(&p.rest[1]).map_err(|e| format!("{cmd}: length: {e}"))?;
    if len > MAX_REQUEST {
        return Err(format!(
            "{cmd}: length cannot exceed {MAX_REQUEST}, given {}",
            p.rest[1]
        ));
    }
    Ok((off, len))
}

/// qemu-io's time format: `SS.CC`, `M:SS.CC` or `H:MM:SS.CC`.
fn timestr(t: Duration) -> String {
    let cs = t.as_millis() / 10;
    let (secs, cents) = (cs / 100, cs % 100);
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}.{cents:02}")
    } else if m > 0 {
        format!("{m}:{s:02}.{cents:02}")
    } else {
        format!("{s:02}.{cents:02}")
    }
}

/// Print the two lines qemu-io prints after a transfer.
fn report(verb: &str, len: u64, off: u64, t: Duration) {
    let secs = t.as_secs_f64().max(1e-9);
    println!("{verb} {len}/{len} bytes at offset {off}");
    println!(
        "{}, 1 ops; {} sec ({}/sec and {:.4} ops/sec)",
        io_units(len as f64),
        timestr(t),
        io_units(len as f64 / secs),
        1.0 / secs
    );
}

/// qemu-io's hex dump of `buf` read at `off`.
fn hexdump(off: u64, buf: &[u8]) {
    let mut out = std::io::stdout().lock();
    for (i, line) in buf.chunks(16).enumerate() {
        let mut s = format!("{:08x}:  ", off + 16 * i as u64);
        for b in line {
            s.push_str(&format!("{b:02x} "));
        }
        s.push(' ');
        s.extend(line.iter().map(|&b| {
            if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            }
        }));
        let _ = writeln!(out, "{s}");
    }
}

/// The image a session works on.
struct Session<'a> {
    img: &'a Image,
    path: &'a Path,
}

/// What one command did.
enum Outcome {
    Ok,
    Failed,
    Quit,
}

const HELP: &str = "\
write [-fqz] [-u] [-P pattern] off len -- writes a pattern (default 0xcd), or zeros with -z (-u: may unmap), -f: FUA
read [-qv] [-P pattern] off len -- reads, verifies the pattern with -P, hex dump with -v
discard [-q] off len -- discards a range (reads as zeros afterwards)
flush -- makes every completed write durable
map -- prints which ranges are in the image and which come from the base
alloc off [len] -- how many bytes of a range are in the image
length -- the size of the virtual disk
info -- format and geometry
aio_write, aio_read, aio_flush -- same as write, read, flush
quit -- stop reading commands";

impl Session<'_> {
    fn fail(&self, what: &str, e: fvd_core::Error) -> Outcome {
        eprintln!("fvd: {what} failed: {}", at(self.path, e));
        Outcome::Failed
    }

    async fn run_line(&self, line: &str) -> Outcome {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&cmd, args)) = words.split_first() else {
            return Outcome::Ok;
        };
        if cmd.starts_with('#') {
            return Outcome::Ok;
        }
        let r = match cmd {
            "write" | "aio_write" => self.write(args).await,
            "read" | "aio_read" => self.read(args).await,
            "discard" => self.discard(args).await,
            "flush" | "aio_flush" => {
                return match self.img.flush().await {
                    Ok(()) => Outcome::Ok,
                    Err(e) => self.fail("flush", e),
                };
            }
            "map" => self.map().await,
            "alloc" => self.alloc(args).await,
            "length" => {
                println!("{}", io_units(self.img.virtual_size() as f64));
                Ok(Outcome::Ok)
            }
            "info" => {
                println!(
                    "format name: {}",
                    if self.img.header().is_some() {
                        "fvd"
                    } else {
                        "raw"
                    }
                );
                println!("cluster size: {}", io_units(self.img.block_size() as f64));
                println!("virtual size: {}", io_units(self.img.virtual_size() as f64));
                Ok(Outcome::Ok)
            }
            "help" => {
                println!("{HELP}");
                Ok(Outcome::Ok)
            }
            "quit" | "q" | "exit" => Ok(Outcome::Quit),
            other => Err(format!("command \"{other}\" not found (try 'help')")),
        };
        match r {
            Ok(o) => o,
            Err(msg) => {
                eprintln!("fvd: {msg}");
                Outcome::Failed
            }
        }
    }

    async fn write(&self, args: &[&str]) -> Result<Outcome, String> {
        let p = getopt(args, "fqzuCrbcn", "P")?;
        let (off, len) = off_len(&p, "write")?;
        let zero = p.has('z');
        if p.has('u') && !zero {
            return Err("write: -u requires -z to be specified".into());
        }
        if zero && p.value('P').is_some() {
            return Err("write: -z and -P cannot be specified at the same time".into());
        }
        let pattern = match p.value('P') {
            Some(s) => parse_pattern(s)?,
            None => 0xcd,
        };
        let fua = p.has('f');
        let t0 = Instant::now();
        let r = if zero {
            self.img.write_zeroes(off, len, p.has('u'), fua).await
        } else {
            let mut buf = IoBuf::for_overwrite(len as usize);
            buf.fill(pattern);
            self.img.write(off, buf, fua).await.map(drop)
        };
        if let Err(e) = r {
            return Ok(self.fail("write", e));
        }
        if !p.has('q') {
            report("wrote", len, off, t0.elapsed());
        }
        Ok(Outcome::Ok)
    }

    async fn read(&self, args: &[&str]) -> Result<Outcome, String> {
        let p = getopt(args, "qvCrab", "P")?;
        let (off, len) = off_len(&p, "read")?;
        let pattern = p.value('P').map(parse_pattern).transpose()?;
        let t0 = Instant::now();
        let buf = match self.img.read(off, IoBuf::for_overwrite(len as usize)).await {
            Ok(b) => b,
            Err(e) => return Ok(self.fail("read", e)),
        };
        let t = t0.elapsed();
        let mut outcome = Outcome::Ok;
        if let Some(pat) = pattern
            && buf.iter().any(|&b| b != pat)
        {
            println!("Pattern verification failed at offset {off}, {len} bytes");
            outcome = Outcome::Failed;
        }
        if p.has('v') {
            hexdump(off, &buf);
        }
        if !p.has('q') {
            report("read", len, off, t);
        }
        Ok(outcome)
    }

    async fn discard(&self, args: &[&str]) -> Result<Outcome, String> {
        let p = getopt(args, "qC", "")?;
        let (off, len) = off_len(&p, "discard")?;
        let t0 = Instant::now();
        if let Err(e) = self.img.discard(off, len).await {
            return Ok(self.fail("discard", e));
        }
        if !p.has('q') {
            report("discard", len, off, t0.elapsed());
        }
        Ok(Outcome::Ok)
    }

    /// Runs of `[off, off+len)`: (start, length, in the image).
    async fn allocation(&self, off: u64, len: u64) -> Result<Vec<(u64, u64, bool)>, String> {
        let ext = extents(self.img, self.path, off, len)
            .await
            .map_err(|e| format!("map failed: {e}"))?;
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for e in ext {
            let alloc = e.source == Source::Image;
            match runs.last_mut() {
                Some(r) if r.2 == alloc && r.0 + r.1 == e.start => r.1 += e.length,
                _ => runs.push((e.start, e.length, alloc)),
            }
        }
        Ok(runs)
    }

    async fn map(&self) -> Result<Outcome, String> {
        for (s, l, alloc) in self.allocation(0, self.img.virtual_size()).await? {
            println!(
                "{} ({l:#x}) bytes {} allocated at offset {} ({s:#x})",
                io_units(l as f64),
                if alloc { "   " } else { "not" },
                io_units(s as f64)
            );
        }
        Ok(Outcome::Ok)
    }

    async fn alloc(&self, args: &[&str]) -> Result<Outcome, String> {
        let off = args
            .first()
            .ok_or("alloc: expected an offset")
            .and_then(|s| parse_size(s).map_err(|_| "alloc: bad offset"))?;
        let len = match args.get(1) {
            Some(s) => parse_size(s).map_err(|e| format!("alloc: length: {e}"))?,
            None => 512,
        };
        let end = off
            .checked_add(len)
            .filter(|&e| e <= self.img.virtual_size());
        if end.is_none() {
            return Err(format!(
                "alloc: {off}+{len} lies outside the virtual disk ({} bytes)",
                self.img.virtual_size()
            ));
        }
        let sum: u64 = self
            .allocation(off, len)
            .await?
            .iter()
            .filter(|r| r.2)
            .map(|r| r.1)
            .sum();
        println!(
            "{sum}/{len} bytes allocated at offset {}",
            io_units(off as f64)
        );
        Ok(Outcome::Ok)
    }
}

/// Run `fvd io`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let img = open(opener, &a.image, a.format, a.read_only, a.force_share).await?;
    require_key(&img, &a.image)?;
    let s = Session {
        img: &img,
        path: &a.image,
    };
    let mut failed = false;
    if a.commands.is_empty() {
        let stdin = std::io::stdin();
        let interactive = stdin.is_terminal();
        let mut lines = stdin.lock().lines();
        loop {
            if interactive {
                print!("fvd-io> ");
                let _ = std::io::stdout().flush();
            }
            let Some(line) = lines.next() else { break };
            let line = line.map_err(|e| anyhow::anyhow!("standard input: {e}"))?;
            match s.run_line(&line).await {
                Outcome::Ok => {}
                Outcome::Failed => failed = true,
                Outcome::Quit => break,
            }
        }
    } else {
        for c in &a.commands {
            match s.run_line(c).await {
                Outcome::Ok => {}
                Outcome::Failed => failed = true,
                Outcome::Quit => break,
            }
        }
    }
    img.close().await.map_err(|e| at(&a.image, e))?;
    Ok(u8::from(failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getopt_like_qemu_io() {
        let p = getopt(&["-P", "0xab", "0", "1M"], "qz", "P").unwrap();
        assert_eq!(p.value('P'), Some("0xab"));
        assert_eq!(p.rest, vec!["0", "1M"]);
        let p = getopt(&["-zu", "4k", "4k"], "zu", "P").unwrap();
        assert!(p.has('z') && p.has('u'));
        let p = getopt(&["-P0x11", "0", "1"], "", "P").unwrap();
        assert_eq!(p.value('P'), Some("0x11"));
        assert!(getopt(&["-x", "0", "1"], "q", "P").is_err());
        assert!(getopt(&["-P"], "", "P").is_err());
    }

    #[test]
    fn patterns() {
        assert_eq!(parse_pattern("0xab"), Ok(0xab));
        assert_eq!(parse_pattern("17"), Ok(17));
        assert_eq!(parse_pattern("017"), Ok(15));
        assert_eq!(parse_pattern("0"), Ok(0));
        assert!(parse_pattern("256").is_err());
        assert!(parse_pattern("0x12x").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(timestr(Duration::from_millis(0)), "00.00");
        assert_eq!(timestr(Duration::from_millis(1234)), "01.23");
        assert_eq!(timestr(Duration::from_secs(61)), "1:01.00");
        assert_eq!(timestr(Duration::from_secs(3661)), "1:01:01.00");
    }
}
