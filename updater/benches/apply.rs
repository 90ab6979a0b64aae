//! Update benchmark (issue 5): apply throughput against a raw write, and delta bytes against
//! zsync and casync.
//!
//! `cargo bench -p caisson-update --bench apply` (release build). Everything on the Caisson side
//! goes through the crate's real paths: a disk image file with the Caisson GPT (written by
//! caisson-disk), a [`Machine`] made from parts with its ESP as a directory, bundles written by
//! [`write_bundle`], manifests signed by [`channel::publish`] with a key from [`sign::keygen`],
//! and the channel served on loopback by the crate's [`Server`].
//!
//! Payloads: `APPLY_BENCH_MIB` MiB (64) of 4 KiB data blocks, each block the output of a
//! splitmix64 stream seeded by the block's content id (deterministic, and incompressible as an
//! lz4hc erofs nearly is), followed by its dm-verity tree built as the builder builds it (salt
//! and superblock UUID derived from the data's sha256, so the whole tree changes with the data).
//! Kernel and initramfs are 64 KiB each, so the root payload is what is measured.
//!
//! 1. Throughput, `APPLY_BENCH_RUNS` (3) rounds, median: a full apply of a v2 that shares no
//!    chunk with v1 (everything fetched) into the inactive slot of a fresh disk image, from the
//!    bundle file (`Machine::apply_file`: signature, whole-bundle check, apply) and over HTTP
//!    (`Machine::apply_offer`: fetch, hash, write, sync, read back, kernel, entry; straight to
//!    the crate's Server, no proxy), and `apply::apply` over HTTP without the Machine around it
//!    (no lock, no progress records); against the same bytes written into the same partition of
//!    the same kind of fresh disk image by plain `pwrite` in 4 MiB pieces + `fsync` (the crate's
//!    `Disk::write_at` and `Disk::sync`, source in memory), and by
//!    `dd bs=4M oflag=direct conv=fsync` (source file in the page cache). Also one sha256 pass
//!    over the payload in memory, to read the ratio by, the CPU time of each HTTP apply (the
//!    process's, the in-process server's included), and the HTTP apply on a machine that keeps
//!    v1's chunk index (as one that got v1 by an update does: the running slot is not read).
//! 2. Delta bytes: v2 with 1 % and 10 % of its 4 KiB data blocks changed (scattered, chosen by
//!    a seeded generator) and with one 4 KiB block inserted in the middle (erofs is
//!    block-aligned, so an insertion shifts whole blocks). Each tool rebuilds the same v2 root
//!    payload from the same v1: the updater (`check` + `apply_offer`, v1 in the active slot),
//!    zsync (`zsyncmake` on v2, `zsync -i v1`) and casync (`casync make` of v2 into a chunk
//!    store, `casync extract --seed=v1`). Bytes are counted on the wire by a loopback proxy in
//!    front of each server (server to client: response headers, metadata and payload). The
//!    updater runs once per chunking in `APPLY_BENCH_CHUNKING` (average sizes in KiB, min ¼ and
//!    max 4× each; default `8,16,32`, the first being the builder's default); its wire bytes
//!    include the index, manifest and signature, the root's chunk index, and the kernel and
//!    initramfs (64 KiB each, fetched whole: this machine's ESP holds none of v1's).
//! 3. With `APPLY_BENCH_REAL=DIR`: the same on two real builds of `images/host.toml` in `DIR/v1`
//!    and `DIR/v2` (`updater/benches/real-images.sh` makes them: v2 adds one package). Roots,
//!    kernels and initramfs are taken out of the builds' bundles and bundled again by this
//!    code; the machine has v1's root in slot A and v1's kernel and initramfs on its ESP, as a
//!    machine running v1 does. Compared with the full payload (root + kernel + initramfs), and
//!    with zsync and casync rebuilding the v2 root from the v1 root.
//!
//! zsync asks for several ranges in one request (`Range: bytes=a-b,c-d,...`); the crate's Server
//! answers multi-range requests with 416 (the updater asks for one range at a time) and Python's
//! http.server ignores Range, so zsync is served by the small multi-range server below. casync
//! fetches whole chunk files with curl and is served by the crate's Server.
//!
//! Prints `BENCH key=value` lines. Only loopback traffic. The work directory (under /var/tmp, a
//! disk, so fsync means something) is removed at the end and on error.

use anyhow::{anyhow, bail, Context, Result};
use caisson_disk::PartitionContent;
use caisson_layout::cmdline::BootParams;
use caisson_layout::partition::{partition_guid, Part};
use caisson_layout::{entry, paths, verity, EntryName, Slot};
use caisson_update::apply::{self, ApplyStats, Progress, Quiet, StopAfter, Target};
use caisson_update::bundle::{
    write_bundle_chunked, ArtifactKind, BundleInput, ChunkIndex, Chunking, Manifest,
};
use caisson_update::channel::{self, PublishOptions, Server};
use caisson_update::chunk_cache;
use caisson_update::download::{HttpSource, Limits};
use caisson_update::machine::Machine;
use caisson_update::sign;
use caisson_update::slots::Disk;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
const BLOCK: usize = 4096;
const IMAGE: &str = "host";
const V1: &str = "1.0.0";
const V2: &str = "2.0.0";
const MACHINE_ID: &str = "0123456789abcdef0123456789abcdef";

/// What the environment asks for.
struct Settings {
    mib: u64,
    runs: usize,
    /// `APPLY_BENCH_DELTA=0` skips part 2 (no zsync, no casync): for work on the apply path.
    delta: bool,
    /// `APPLY_BENCH_THROUGHPUT=0` skips part 1.
    throughput: bool,
    /// `APPLY_BENCH_CHUNKING=8,16,32`: the average chunk sizes (KiB) parts 2 and 3 try, min a
    /// quarter and max four times each; the first is the default the builder uses.
    chunkings: Vec<Chunking>,
    /// `APPLY_BENCH_REAL=DIR`: part 3 on the two builds in `DIR/v1` and `DIR/v2` (bundle and
    /// manifest each; `updater/benches/real-images.sh` makes them).
    real: Option<PathBuf>,
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// `APPLY_BENCH_CHUNKING`, the default's average first.
fn chunkings_from_env() -> Result<Vec<Chunking>> {
    let default = Chunking::default();
    let text = std::env::var("APPLY_BENCH_CHUNKING").unwrap_or_else(|_| {
        let others = [8, 16, 32]
            .into_iter()
            .filter(|k| k * 1024 != default.avg_size);
        std::iter::once(default.avg_size / 1024)
            .chain(others)
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(",")
    });
    let mut out = Vec::new();
    for kib in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let avg: u32 = kib
            .parse::<u32>()
            .with_context(|| format!("APPLY_BENCH_CHUNKING: {kib:?} is not a number of KiB"))?
            * 1024;
        let c = Chunking {
            min_size: avg / 4,
            avg_size: avg,
            max_size: avg * 4,
            ..default.clone()
        };
        c.cutter()
            .map_err(|e| anyhow!("APPLY_BENCH_CHUNKING={text}: {e}"))?;
        out.push(c);
    }
    if out.is_empty() {
        out.push(default);
    }
    Ok(out)
}

fn chunking_name(c: &Chunking) -> String {
    format!("{}/{}/{}", c.min_size, c.avg_size, c.max_size)
}

impl Settings {
    fn from_env() -> Result<Settings> {
        Ok(Settings {
            mib: env_number("APPLY_BENCH_MIB", 64)?.max(1),
            runs: usize::try_from(env_number("APPLY_BENCH_RUNS", 3)?)?.max(1),
            delta: env_number("APPLY_BENCH_DELTA", 1)? != 0,
            throughput: env_number("APPLY_BENCH_THROUGHPUT", 1)? != 0,
            chunkings: chunkings_from_env()?,
            real: std::env::var_os("APPLY_BENCH_REAL").map(PathBuf::from),
        })
    }
}

/// Prints one result line at once (the run is long; show progress).
fn bench(line: &str) {
    println!("BENCH {line}");
    let _ = std::io::stdout().flush();
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

// ---------------------------------------------------------------------------------------------
// Deterministic payloads.

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `out` with the splitmix64 stream seeded by `id`.
fn fill(id: u64, out: &mut [u8]) {
    let mut s = mix(id ^ 0x5EED_CA15_5017_0000);
    for w in out.chunks_mut(8) {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let z = mix(s).to_le_bytes();
        w.copy_from_slice(&z[..w.len()]);
    }
}

/// A generated root payload (data blocks, then the verity tree) in a file.
struct Payload {
    path: PathBuf,
    size: u64,
    verity: verity::VerityParams,
    sha256: String,
}

/// Writes the payload whose data blocks have the content ids `ids`.
fn write_payload(path: &Path, ids: &[u64]) -> Result<Payload> {
    let mut data = vec![0u8; ids.len() * BLOCK];
    for (block, id) in data.chunks_exact_mut(BLOCK).zip(ids) {
        fill(*id, block);
    }
    let sha: [u8; 32] = Sha256::digest(&data).into();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sha[..16]);
    let tree = verity::build(&data[..], verity::derive_salt(&sha), uuid)?;
    let mut f = File::create(path).with_context(|| format!("creating {path:?}"))?;
    f.write_all(&data)
        .and_then(|()| f.write_all(&tree.bytes))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {path:?}"))?;
    let mut whole = Sha256::new();
    whole.update(&data);
    whole.update(&tree.bytes);
    Ok(Payload {
        path: path.to_path_buf(),
        size: (data.len() + tree.bytes.len()) as u64,
        verity: tree.params,
        sha256: hex::encode(whole.finalize()),
    })
}

/// `k` distinct block indices out of `n`, chosen by a seeded generator (partial Fisher-Yates).
fn scattered(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut s = seed;
    for i in 0..k.min(n) {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let j = i + (mix(s) % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k.min(n));
    idx
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {path:?}"))?;
    let mut hash = Sha256::new();
    std::io::copy(&mut f, &mut hash).with_context(|| format!("reading {path:?}"))?;
    Ok(hex::encode(hash.finalize()))
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {path:?}"))?
        .len())
}

// ---------------------------------------------------------------------------------------------
// The machine: a disk image file with v1 in slot A, an ESP directory, a state directory.

struct Work {
    dir: PathBuf,
    keys: PathBuf,
    secret: PathBuf,
    www: PathBuf,
    slot_size: u64,
    v1: Payload,
    /// v1's kernel and initramfs, put on the machine's ESP where v1 booted from them; `None`:
    /// the ESP holds none, and every apply fetches the kernel and initramfs whole.
    boot: Option<(PathBuf, PathBuf)>,
}

fn booted(version: &str, slot: Slot, v: verity::VerityParams) -> BootParams {
    BootParams {
        version: version.into(),
        slot,
        root: partition_guid(IMAGE, Part::root(slot)),
        state: partition_guid(IMAGE, Part::State),
        esp: partition_guid(IMAGE, Part::Esp),
        verity: Some(v),
        debug: false,
    }
}

/// A new disk image at `path`: the Caisson GPT, v1 in root-a, root-b empty.
fn fresh_disk(w: &Work, path: &Path) -> Result<()> {
    let parts = [
        PartitionContent {
            part: Part::Esp,
            size: 2 * MIB,
            content: None,
        },
        PartitionContent {
            part: Part::RootA,
            size: w.slot_size,
            content: Some(w.v1.path.clone()),
        },
        PartitionContent {
            part: Part::RootB,
            size: w.slot_size,
            content: None,
        },
        PartitionContent {
            part: Part::State,
            size: MIB,
            content: None,
        },
    ];
    caisson_disk::write_disk(&parts, path, IMAGE, V1)
        .with_context(|| format!("writing the disk image {path:?}"))?;
    Ok(())
}

/// The parts of a machine running v1 from slot A (blessed), in the new directory `dir`:
/// its disk, its ESP directory and its boot parameters.
fn fresh_parts(w: &Work, dir: &Path) -> Result<(Disk, PathBuf, BootParams)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
    let disk = dir.join("disk.raw");
    fresh_disk(w, &disk)?;
    let esp = dir.join("esp");
    let entries = esp.join(paths::ESP_ENTRIES_DIR);
    std::fs::create_dir_all(&entries).with_context(|| format!("creating {entries:?}"))?;
    let b = booted(V1, Slot::A, w.v1.verity);
    let first = entries.join(EntryName::new_blessed(V1, Slot::A).to_string());
    std::fs::write(&first, entry::render(&b, "")).with_context(|| format!("writing {first:?}"))?;
    let payload_dir = esp.join(paths::esp_payload_dir(V1, Slot::A));
    std::fs::create_dir_all(&payload_dir).with_context(|| format!("creating {payload_dir:?}"))?;
    if let Some((kernel, initrd)) = &w.boot {
        for (from, to) in [
            (kernel, paths::esp_kernel(V1, Slot::A)),
            (initrd, paths::esp_initrd(V1, Slot::A)),
        ] {
            std::fs::copy(from, esp.join(&to)).with_context(|| format!("copying {from:?}"))?;
        }
    }
    Ok((Disk::open(&disk)?, esp, b))
}

/// A machine running v1 from slot A (blessed), in the new directory `dir`.
fn fresh_machine(w: &Work, dir: &Path) -> Result<Machine> {
    let (disk, esp, b) = fresh_parts(w, dir)?;
    Ok(Machine::from_parts(
        disk,
        &esp,
        b,
        IMAGE,
        &w.keys,
        &dir.join("state"),
        MACHINE_ID,
    ))
}

/// A v2 release published into the channel `www/<channel>`.
struct Release {
    manifest: Manifest,
    bundle: PathBuf,
    signed: PathBuf,
    /// index.json, the manifest and its signature: what `check` fetches.
    meta_bytes: u64,
    /// Root, kernel and initramfs: what a full update carries.
    full_bytes: u64,
}

/// Publishes v2 with root payload `root` (cut by `chunking`) into `www/<channel>`; with the
/// kernel and initramfs of `boot`, or generated 64 KiB ones (the same in every release).
fn release(
    w: &Work,
    channel: &str,
    root: &Payload,
    chunking: &Chunking,
    boot: Option<(&Path, &Path)>,
) -> Result<Release> {
    let out = w.dir.join("out").join(channel);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {out:?}"))?;
    let (kernel, initrd) = match boot {
        Some((k, i)) => (k.to_path_buf(), i.to_path_buf()),
        None => {
            let mut boot = vec![0u8; 64 * 1024];
            let kernel = out.join("vmlinuz");
            fill(1 << 50, &mut boot);
            std::fs::write(&kernel, &boot).with_context(|| format!("writing {kernel:?}"))?;
            let initrd = out.join("initrd");
            fill((1 << 50) + 1, &mut boot);
            std::fs::write(&initrd, &boot).with_context(|| format!("writing {initrd:?}"))?;
            (kernel, initrd)
        }
    };
    let bundle = out.join(format!("{IMAGE}-{V2}.bundle"));
    let m = write_bundle_chunked(
        &BundleInput {
            image: IMAGE,
            version: V2,
            build_time: 1,
            verity: root.verity,
            cmdline_extra: "console=ttyS0",
            root: &root.path,
            kernel: &kernel,
            initrd: &initrd,
        },
        &bundle,
        chunking,
    )?;
    let mpath = out.join(format!("{IMAGE}-{V2}.manifest.json"));
    std::fs::write(&mpath, m.to_json()).with_context(|| format!("writing {mpath:?}"))?;
    let chan = w.www.join(channel);
    channel::publish(
        &bundle,
        &mpath,
        &chan,
        &w.secret,
        &PublishOptions::default(),
    )?;
    std::fs::remove_dir_all(&out).with_context(|| format!("removing {out:?}"))?;
    let signed = chan.join(format!("{IMAGE}-{V2}.manifest.json"));
    let manifest = Manifest::load(&signed)?;
    let meta_bytes = file_len(&chan.join(channel::INDEX))?
        + file_len(&signed)?
        + file_len(&sign::sig_path(&signed))?;
    let full_bytes = manifest.artifacts.iter().map(|a| a.size).sum();
    Ok(Release {
        bundle: chan.join(format!("{IMAGE}-{V2}.bundle")),
        manifest,
        signed,
        meta_bytes,
        full_bytes,
    })
}

/// Times the steps the apply reports.
#[derive(Default)]
struct Steps {
    current: Option<(&'static str, Instant)>,
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn finish(&mut self) {
        if let Some((name, t)) = self.current.take() {
            self.done.push((name, t.elapsed()));
        }
    }

    /// `invalidate_ms=.. write_root_ms=.. ...`
    fn line(&self) -> String {
        STEPS
            .iter()
            .map(|n| format!("{n}_ms={:.0}", self.ms(n)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn ms(&self, name: &str) -> f64 {
        self.done
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, d)| d.as_secs_f64() * 1e3)
            .sum()
    }
}

impl Progress for Steps {
    fn root(&mut self, _: u64, _: u64) {}
    fn step(&mut self, what: &str) {
        self.finish();
        let name = if what.contains("invalidat") {
            "invalidate"
        } else if what.contains("root payload") {
            "write_root"
        } else if what.contains("verifying") {
            "verify"
        } else if what.contains("kernel") {
            "kernel"
        } else if what.contains("entry") {
            "entry"
        } else {
            "other"
        };
        self.current = Some((name, Instant::now()));
    }
}

const STEPS: [&str; 5] = ["invalidate", "write_root", "verify", "kernel", "entry"];

// ---------------------------------------------------------------------------------------------
// Loopback HTTP: a byte-counting proxy, and a server that answers multi-range requests.

/// Forwards connections to `backend`, counting the bytes the server sends back.
struct Proxy {
    addr: String,
    down: Arc<AtomicU64>,
}

impl Proxy {
    fn start(backend: &str) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        let addr = listener.local_addr()?.to_string();
        let down = Arc::new(AtomicU64::new(0));
        let count = down.clone();
        let backend = backend.to_string();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if let Ok(server) = TcpStream::connect(&backend) {
                    pipe(client, server, count.clone());
                }
            }
        });
        Ok(Proxy { addr, down })
    }

    /// Bytes sent to clients since the last call.
    fn take(&self) -> u64 {
        self.down.swap(0, Ordering::SeqCst)
    }
}

fn pipe(client: TcpStream, server: TcpStream, count: Arc<AtomicU64>) {
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    std::thread::spawn(move || copy(client, server, None));
    std::thread::spawn(move || copy(server2, client2, Some(&count)));
}

fn copy(mut from: TcpStream, mut to: TcpStream, count: Option<&AtomicU64>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // Counted before it is passed on: once the client has it, it is counted.
                if let Some(c) = count {
                    c.fetch_add(n as u64, Ordering::SeqCst);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A static file server that answers `Range` with one or several ranges (multipart/byteranges).
fn serve_multirange(root: &Path) -> Result<String> {
    let server = tiny_http::Server::http("127.0.0.1:0")
        .map_err(|e| anyhow!("binding the multi-range server: {e}"))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("the multi-range server has no IP address")?
        .to_string();
    let root = root.to_path_buf();
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            if let Err(e) = answer_ranges(&root, req) {
                eprintln!("apply bench: multi-range server: {e}");
            }
        }
    });
    Ok(addr)
}

fn header(name: &str, value: &str) -> std::io::Result<tiny_http::Header> {
    tiny_http::Header::from_bytes(name, value)
        .map_err(|()| std::io::Error::other(format!("bad header {name}: {value}")))
}

/// `bytes=a-b,c-,-n` against a file of `size` bytes; `None` if any range is unusable.
fn parse_ranges(h: &str, size: u64) -> Option<Vec<(u64, u64)>> {
    let spec = h.trim().strip_prefix("bytes=")?;
    let mut out = Vec::new();
    for r in spec.split(',') {
        let (a, b) = r.trim().split_once('-')?;
        let (start, end) = match (a.trim(), b.trim()) {
            ("", n) => (size.saturating_sub(n.parse().ok()?), size.checked_sub(1)?),
            (a, "") => (a.parse().ok()?, size.checked_sub(1)?),
            (a, b) => (
                a.parse().ok()?,
                b.parse::<u64>().ok()?.min(size.checked_sub(1)?),
            ),
        };
        if start > end {
            return None;
        }
        out.push((start, end));
    }
    (!out.is_empty()).then_some(out)
}

fn answer_ranges(root: &Path, req: tiny_http::Request) -> std::io::Result<()> {
    use tiny_http::{Response, StatusCode};
    let rel = req.url().split('?').next().unwrap_or("/");
    let rel = rel.trim_start_matches('/').to_string();
    let path = root.join(&rel);
    let file = match File::open(&path) {
        Ok(f) if !rel.split('/').any(|c| c == "..") && path.is_file() => f,
        _ => return req.respond(Response::empty(StatusCode(404))),
    };
    let size = file.metadata()?.len();
    let range = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.as_str().to_string());
    let Some(range) = range else {
        return req.respond(Response::from_file(file).with_chunked_threshold(usize::MAX));
    };
    let Some(ranges) = parse_ranges(&range, size) else {
        return req.respond(Response::empty(StatusCode(416)));
    };
    let read = |a: u64, b: u64| -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; (b + 1 - a) as usize];
        file.read_exact_at(&mut buf, a)?;
        Ok(buf)
    };
    // zsync reads bodies by Content-Length: never chunked (tiny_http chunks from 32 KiB on).
    if let [(a, b)] = ranges[..] {
        let resp = Response::from_data(read(a, b)?)
            .with_chunked_threshold(usize::MAX)
            .with_status_code(206)
            .with_header(header("Content-Range", &format!("bytes {a}-{b}/{size}"))?);
        return req.respond(resp);
    }
    let boundary = "caissonbenchboundary";
    let mut body = Vec::new();
    // Each delimiter starts on a new line (RFC 2046), the first one too: zsync reads a line
    // before each delimiter.
    for (a, b) in ranges {
        write!(
            body,
            "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\
             Content-Range: bytes {a}-{b}/{size}\r\n\r\n"
        )?;
        body.extend_from_slice(&read(a, b)?);
    }
    write!(body, "\r\n--{boundary}--\r\n")?;
    let resp = Response::from_data(body)
        .with_chunked_threshold(usize::MAX)
        .with_status_code(206)
        .with_header(header(
            "Content-Type",
            &format!("multipart/byteranges; boundary={boundary}"),
        )?);
    req.respond(resp)
}

// ---------------------------------------------------------------------------------------------
// External tools.

/// How long one tool may run before it is killed (zsync retries forever on a response it
/// cannot parse).
const TOOL_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs a tool to completion, its output (stdout and stderr) going to `log`; the output on
/// success, its end in the error otherwise. Killed after [`TOOL_TIMEOUT`].
fn run(cmd: &mut Command, log: &Path) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = File::create(log).with_context(|| format!("creating {log:?}"))?;
    let err = out.try_clone().with_context(|| format!("{log:?}"))?;
    let mut child = cmd
        .env("no_proxy", "127.0.0.1")
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("running {shown}"))?;
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(10)..].join("\n");
    match status {
        Some(s) if s.success() => Ok(text),
        Some(s) => bail!("{shown} failed ({s}):\n{tail}"),
        None => bail!("{shown} did not finish within {TOOL_TIMEOUT:?}:\n{tail}"),
    }
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput.

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The same bytes as the apply writes, by `pwrite` in 4 MiB pieces and one `fsync`.
fn raw_write(w: &Work, dir: &Path, bytes: &[u8]) -> Result<Duration> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
    let path = dir.join("disk.raw");
    fresh_disk(w, &path)?;
    let disk = Disk::open(&path)?;
    let t = Instant::now();
    for (i, piece) in bytes.chunks(4 * MIB as usize).enumerate() {
        disk.write_at(Part::RootB, i as u64 * 4 * MIB, piece)?;
    }
    disk.sync()?;
    let d = t.elapsed();
    drop(disk);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {dir:?}"))?;
    Ok(d)
}

/// The same bytes by `dd oflag=direct conv=fsync` into root-b.
fn dd_write(w: &Work, dir: &Path, src: &Path) -> Result<Duration> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
    let path = dir.join("disk.raw");
    fresh_disk(w, &path)?;
    let start = Disk::open(&path)?.extent(Part::RootB).start;
    let t = Instant::now();
    run(
        Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", path.display()))
            .arg("bs=4M")
            .arg(format!("seek={start}"))
            .arg("oflag=direct,seek_bytes")
            .arg("conv=notrunc,fsync")
            .arg("status=none"),
        &dir.join("dd.log"),
    )?;
    let d = t.elapsed();
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {dir:?}"))?;
    Ok(d)
}

/// `Machine::apply_file`: signature, whole-bundle check, apply.
fn time_apply_file(w: &Work, dir: &Path, rel: &Release) -> Result<Duration> {
    let m = fresh_machine(w, dir)?;
    let t = Instant::now();
    let stats = m.apply_file(&rel.bundle, &rel.signed, &mut Steps::default())?;
    let d = t.elapsed();
    check_full(&stats, &rel.manifest)?;
    drop(m);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {dir:?}"))?;
    Ok(d)
}

/// CPU time this process has used (user and system, every thread: the apply's and the
/// in-process server's), in milliseconds, at the kernel's tick resolution (10 ms).
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) ends with ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    ticks * 10.0
}

/// `Machine::check` (untimed), then `Machine::apply_offer`; the steps it reported and the CPU
/// time it took. With `cached`, the machine keeps v1's chunk index, as one that got v1 by an
/// update does.
fn time_apply_http(
    w: &Work,
    dir: &Path,
    rel: &Release,
    url: &str,
    cached: Option<&ChunkIndex>,
) -> Result<(Duration, Steps, f64)> {
    let m = fresh_machine(w, dir)?;
    if let Some(index) = cached {
        chunk_cache::store(
            &m.records.chunk_cache_dir(),
            &w.v1.verity.root_hash,
            &Chunking::default(),
            index,
            None,
        )?;
    }
    let offer = m
        .check(url)?
        .context("the channel offers nothing newer than 1.0.0")?;
    let mut steps = Steps::default();
    let cpu = cpu_ms();
    let t = Instant::now();
    let stats = m.apply_offer(&offer, &mut steps)?;
    let d = t.elapsed();
    let cpu = cpu_ms() - cpu;
    steps.finish();
    if stats.local_index_cached != cached.is_some() {
        bail!("the chunk index cache was not used as set up ({stats:?})");
    }
    check_full(&stats, &rel.manifest)?;
    drop(m);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {dir:?}"))?;
    Ok((d, steps, cpu))
}

/// `apply::apply` over HTTP without the Machine around it: no lock, no progress records.
fn time_apply_core(w: &Work, dir: &Path, rel: &Release, bundle_url: &str) -> Result<Duration> {
    let (disk, esp, booted) = fresh_parts(w, dir)?;
    let mut src = HttpSource::new(bundle_url, Limits::default())?;
    let target = Target {
        disk: &disk,
        esp: &esp,
        booted: &booted,
        chunk_cache: None,
        running_slot_failed: false,
    };
    let t = Instant::now();
    let (_, stats) = apply::apply(
        &target,
        &rel.manifest,
        &mut src,
        &mut Quiet,
        StopAfter::Never,
    )?;
    let d = t.elapsed();
    check_full(&stats, &rel.manifest)?;
    drop(disk);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {dir:?}"))?;
    Ok(d)
}

fn throughput(w: &Work, s: &Settings, blocks: usize, http: &str) -> Result<()> {
    let ids: Vec<u64> = (0..blocks as u64).map(|i| (1 << 40) + i).collect();
    let v2 = write_payload(&w.dir.join("root-full.img"), &ids)?;
    let rel = release(w, "full", &v2, &Chunking::default(), None)?;
    let bytes = std::fs::read(&v2.path).with_context(|| format!("reading {:?}", v2.path))?;
    let url = format!("http://{http}/full");
    let bundle_url = format!("http://{http}/full/{IMAGE}-{V2}.bundle");
    let (mut raw, mut dd, mut file, mut net, mut core) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut cpu, mut cached, mut cached_cpu) = (vec![], vec![], vec![]);
    // v1's chunk index, for the machine that keeps it.
    let mut v1_index = ChunkIndex::default();
    Chunking::default()
        .cutter()
        .map_err(|e| anyhow!(e))?
        .for_each_chunk::<_, std::io::Error>(File::open(&w.v1.path)?, |c| {
            v1_index.push(c);
            Ok(())
        })
        .with_context(|| format!("cutting {:?}", w.v1.path))?;
    // For reading the results: the apply hashes the payload three times (what it fetched, the
    // read-back's sha256 and its verity tree, each on its own thread) plus the inactive slot's
    // chunks and, without a chunk index cache, the active slot's chunks of a length v2 holds;
    // what one sha256 pass over the same bytes costs here.
    let sha256_mb_s = (0..3)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(Sha256::digest(&bytes));
            mb_s(v2.size, t.elapsed())
        })
        .fold(0.0, f64::max);
    let mut steps_runs: Vec<(f64, Steps)> = Vec::new();
    for r in 0..s.runs {
        let rate = |d: Duration| mb_s(v2.size, d);
        raw.push(rate(raw_write(w, &w.dir.join(format!("raw-{r}")), &bytes)?));
        dd.push(rate(dd_write(w, &w.dir.join(format!("dd-{r}")), &v2.path)?));
        file.push(rate(time_apply_file(
            w,
            &w.dir.join(format!("file-{r}")),
            &rel,
        )?));
        let (d, steps, c) = time_apply_http(w, &w.dir.join(format!("http-{r}")), &rel, &url, None)?;
        net.push(rate(d));
        cpu.push(c);
        let dir = w.dir.join(format!("cached-{r}"));
        let (d, _, c) = time_apply_http(w, &dir, &rel, &url, Some(&v1_index))?;
        cached.push(rate(d));
        cached_cpu.push(c);
        core.push(rate(time_apply_core(
            w,
            &w.dir.join(format!("core-{r}")),
            &rel,
            &bundle_url,
        )?));
        bench(&format!(
            "throughput_run={r} raw_write_fsync_mb_s={:.1} dd_direct_mb_s={:.1} \
             apply_file_mb_s={:.1} apply_http_mb_s={:.1} apply_core_http_mb_s={:.1} \
             apply_http_cpu_ms={:.0} apply_http_cached_mb_s={:.1} apply_http_cached_cpu_ms={:.0} {}",
            raw[r],
            dd[r],
            file[r],
            net[r],
            core[r],
            cpu[r],
            cached[r],
            cached_cpu[r],
            steps.line()
        ));
        steps_runs.push((net[r], steps));
    }
    let (raw_m, dd_m, file_m, net_m, core_m) = (
        median(raw.clone()),
        median(dd.clone()),
        median(file.clone()),
        median(net.clone()),
        median(core.clone()),
    );
    bench(&format!(
        "throughput payload_bytes={} runs={} raw_write_fsync_mb_s={raw_m:.1} \
         dd_direct_mb_s={dd_m:.1} apply_file_mb_s={file_m:.1} apply_http_mb_s={net_m:.1} \
         apply_core_http_mb_s={core_m:.1} apply_http_vs_raw={:.3} apply_file_vs_raw={:.3} \
         apply_http_vs_dd={:.3} sha256_mb_s={sha256_mb_s:.0} raw_runs={} dd_runs={} file_runs={} \
         http_runs={} core_runs={} apply_http_cpu_ms={:.0} http_cpu_runs={} \
         apply_http_cached_mb_s={:.1} apply_http_cached_vs_raw={:.3} cached_runs={} \
         apply_http_cached_cpu_ms={:.0} cached_cpu_runs={}",
        v2.size,
        s.runs,
        net_m / raw_m,
        file_m / raw_m,
        net_m / dd_m,
        list(&raw),
        list(&dd),
        list(&file),
        list(&net),
        list(&core),
        median(cpu.clone()),
        list(&cpu),
        median(cached.clone()),
        median(cached.clone()) / raw_m,
        list(&cached),
        median(cached_cpu.clone()),
        list(&cached_cpu),
    ));
    // The step times of the median HTTP run.
    steps_runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, steps)) = steps_runs.get(steps_runs.len() / 2) {
        bench(&format!("throughput_steps {}", steps.line()));
    }
    std::fs::remove_file(&v2.path).with_context(|| format!("removing {:?}", v2.path))?;
    std::fs::remove_dir_all(w.www.join("full")).context("removing the full channel")?;
    Ok(())
}

fn check_full(stats: &ApplyStats, m: &Manifest) -> Result<()> {
    let chunks = m
        .artifact(ArtifactKind::Root)
        .map_or(0, |a| a.index.chunk_count());
    if stats.fetched != chunks {
        bail!(
            "a full apply fetched {} of {chunks} chunks ({stats:?})",
            stats.fetched
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Delta bytes.

struct Servers {
    /// The crate's Server, behind a counting proxy.
    channel: Proxy,
    /// The multi-range server (for zsync), behind a counting proxy.
    ranges: Proxy,
}

fn delta(
    w: &Work,
    srv: &Servers,
    name: &str,
    ids: &[u64],
    changed_blocks: usize,
    chunkings: &[Chunking],
) -> Result<()> {
    let chan = w.www.join(name);
    std::fs::create_dir_all(&chan).with_context(|| format!("creating {chan:?}"))?;
    let v2 = write_payload(&chan.join("root-v2.img"), ids)?;
    let tree_bytes = v2.size - v2.verity.hash_offset;
    bench(&format!(
        "delta={name} payload_bytes={} changed_blocks={changed_blocks} \
         changed_data_bytes={} tree_bytes={tree_bytes}",
        v2.size,
        changed_blocks * BLOCK
    ));
    for c in chunkings {
        let line = caisson_delta(
            w,
            srv,
            &format!("{name}-{}k", c.avg_size / 1024),
            &v2,
            c,
            None,
        )?;
        bench(&format!(
            "delta={name} chunking={} {line}",
            chunking_name(c)
        ));
    }
    bench(&format!(
        "delta={name} {}",
        tools(srv, &chan, &w.dir, name, &w.v1.path, &v2)?
    ));
    std::fs::remove_dir_all(&chan).with_context(|| format!("removing {chan:?}"))?;
    Ok(())
}

/// The updater on one delta: v2 published (cut by `chunking`) into `www/<channel>`, a fresh
/// machine running v1, `check` + `apply_offer` through the counting proxy. Returns the
/// `caisson_*` keys.
fn caisson_delta(
    w: &Work,
    srv: &Servers,
    channel: &str,
    v2: &Payload,
    chunking: &Chunking,
    boot: Option<(&Path, &Path)>,
) -> Result<String> {
    let rel = release(w, channel, v2, chunking, boot)?;
    let index_bytes: u64 = rel
        .manifest
        .artifact(ArtifactKind::Root)
        .map_or(0, |a| a.index.size);
    let dir = w.dir.join(format!("delta-{channel}"));
    let m = fresh_machine(w, &dir)?;
    srv.channel.take();
    let t = Instant::now();
    let offer = m
        .check(&format!("http://{}/{channel}", srv.channel.addr))?
        .context("the channel offers nothing newer than 1.0.0")?;
    let stats = m.apply_offer(&offer, &mut Steps::default())?;
    let d = t.elapsed();
    let wire = srv.channel.take();
    drop(m);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {dir:?}"))?;
    std::fs::remove_dir_all(w.www.join(channel)).with_context(|| format!("removing {channel}"))?;
    Ok(format!(
        "caisson_wire_bytes={wire} full_bytes={} wire_vs_full={:.4} \
         caisson_downloaded_bytes={} caisson_root_bytes={} caisson_root_index_bytes={index_bytes} \
         caisson_boot_bytes={} caisson_meta_bytes={} caisson_chunks_copied={} \
         caisson_chunks_fetched={} caisson_fetch_runs={} caisson_s={:.2}",
        rel.full_bytes,
        wire as f64 / rel.full_bytes as f64,
        stats.downloaded_bytes,
        stats.root_downloaded_bytes,
        stats.downloaded_bytes - stats.root_downloaded_bytes,
        rel.meta_bytes,
        stats.copied,
        stats.fetched,
        stats.fetch_runs,
        d.as_secs_f64()
    ))
}

/// zsync and casync rebuilding `v2` from `v1`, their files in `chan`; the `zsync_*` and
/// `casync_*` keys (`=failed` for a tool that failed, with its error on stderr).
fn tools(
    srv: &Servers,
    chan: &Path,
    work: &Path,
    name: &str,
    v1: &Path,
    v2: &Payload,
) -> Result<String> {
    let tools = work.join(format!("tools-{name}"));
    std::fs::create_dir_all(&tools).with_context(|| format!("creating {tools:?}"))?;
    let mut line = String::new();
    match zsync(srv, chan, &tools, name, v1, v2) {
        Ok(z) => line += &z,
        Err(e) => {
            eprintln!("apply bench: zsync ({name}): {e:#}");
            line += "zsync_wire_bytes=failed";
        }
    }
    match casync(srv, chan, &tools, name, v1, v2) {
        Ok(c) => line += &format!(" {c}"),
        Err(e) => {
            eprintln!("apply bench: casync ({name}): {e:#}");
            line += " casync_wire_bytes=failed";
        }
    }
    std::fs::remove_dir_all(&tools).with_context(|| format!("removing {tools:?}"))?;
    Ok(line)
}

// ---------------------------------------------------------------------------------------------
// 3. Two real builds of images/host.toml.

/// What one build's bundle holds, taken out into files in `out`.
struct Build {
    root: Payload,
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Takes root payload, kernel and initramfs out of the one bundle in `dir`, by its manifest
/// read as plain JSON (offsets, sizes, verity): any manifest format with those fields will do.
fn take_apart(dir: &Path, out: &Path) -> Result<Build> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {out:?}"))?;
    let mpath = std::fs::read_dir(dir)
        .with_context(|| format!("listing {dir:?}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".manifest.json"))
        .with_context(|| format!("no *.manifest.json in {dir:?}"))?;
    let bundle = PathBuf::from(mpath.to_string_lossy().replace(".manifest.json", ".bundle"));
    let text = std::fs::read(&mpath).with_context(|| format!("reading {mpath:?}"))?;
    let m: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("parsing {mpath:?}"))?;
    let f = File::open(&bundle).with_context(|| format!("opening {bundle:?}"))?;
    let mut paths = Vec::new();
    for kind in ["root", "kernel", "initrd"] {
        let a = m["artifacts"]
            .as_array()
            .and_then(|v| v.iter().find(|a| a["kind"] == kind))
            .with_context(|| format!("{mpath:?}: no {kind} artifact"))?;
        let (off, size) = (
            a["offset"].as_u64().context("offset")?,
            a["size"].as_u64().context("size")?,
        );
        let mut buf = vec![0u8; size as usize];
        f.read_exact_at(&mut buf, off)
            .with_context(|| format!("reading {kind} from {bundle:?}"))?;
        let p = out.join(kind);
        std::fs::write(&p, &buf).with_context(|| format!("writing {p:?}"))?;
        paths.push((p, size, hex::encode(Sha256::digest(&buf))));
    }
    let v = &m["verity"];
    let hex32 = |k: &str| -> Result<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(v[k].as_str().unwrap_or_default(), &mut out)
            .with_context(|| format!("{mpath:?}: verity.{k}"))?;
        Ok(out)
    };
    let verity = verity::VerityParams {
        root_hash: hex32("root_hash")?,
        salt: hex32("salt")?,
        data_blocks: v["data_blocks"].as_u64().context("data_blocks")?,
        hash_offset: v["hash_offset"].as_u64().context("hash_offset")?,
    };
    let mut it = paths.into_iter();
    let (Some(root), Some(kernel), Some(initrd)) = (it.next(), it.next(), it.next()) else {
        bail!("{mpath:?}: artifacts missing");
    };
    Ok(Build {
        root: Payload {
            path: root.0,
            size: root.1,
            verity,
            sha256: root.2,
        },
        kernel: kernel.0,
        initrd: initrd.0,
    })
}

fn real(w: &Work, srv: &Servers, dir: &Path, chunkings: &[Chunking]) -> Result<()> {
    let base = w.dir.join("real");
    let chan = w.www.join("real");
    std::fs::create_dir_all(&chan).with_context(|| format!("creating {chan:?}"))?;
    let b1 = take_apart(&dir.join("v1"), &base.join("v1"))?;
    let mut b2 = take_apart(&dir.join("v2"), &chan)?;
    // Where zsync's and casync's steps expect v2's root.
    let root_v2 = chan.join("root-v2.img");
    std::fs::rename(&b2.root.path, &root_v2).with_context(|| format!("renaming {root_v2:?}"))?;
    b2.root.path = root_v2;
    let same = |a: &Path, b: &Path| -> Result<bool> { Ok(sha256_file(a)? == sha256_file(b)?) };
    bench(&format!(
        "real v1_root_bytes={} v2_root_bytes={} v2_kernel_bytes={} v2_initrd_bytes={} \
         kernel_unchanged={} initrd_unchanged={} tree_bytes={}",
        b1.root.size,
        b2.root.size,
        file_len(&b2.kernel)?,
        file_len(&b2.initrd)?,
        same(&b1.kernel, &b2.kernel)?,
        same(&b1.initrd, &b2.initrd)?,
        b2.root.size - b2.root.verity.hash_offset,
    ));
    let rw = Work {
        dir: base.clone(),
        keys: w.keys.clone(),
        secret: w.secret.clone(),
        www: w.www.clone(),
        slot_size: (b1.root.size.max(b2.root.size) + 8 * MIB).div_ceil(MIB) * MIB,
        v1: b1.root,
        boot: Some((b1.kernel, b1.initrd)),
    };
    for c in chunkings {
        let line = caisson_delta(
            &rw,
            srv,
            &format!("real-{}k", c.avg_size / 1024),
            &b2.root,
            c,
            Some((&b2.kernel, &b2.initrd)),
        )?;
        bench(&format!("real chunking={} {line}", chunking_name(c)));
    }
    // zsync and casync on the root payload (the kernel and initramfs are not theirs to rebuild).
    let tools = tools(srv, &chan, &base, "real", &rw.v1.path, &b2.root)?;
    bench(&format!("real root_only {tools}"));
    std::fs::remove_dir_all(&chan).with_context(|| format!("removing {chan:?}"))?;
    std::fs::remove_dir_all(&base).with_context(|| format!("removing {base:?}"))?;
    Ok(())
}

fn zsync(
    srv: &Servers,
    chan: &Path,
    tools: &Path,
    name: &str,
    v1: &Path,
    v2: &Payload,
) -> Result<String> {
    for t in ["zsyncmake", "zsync"] {
        if !have(t) {
            bail!("{t} is not installed: apt-get install -y zsync");
        }
    }
    let control = chan.join("root-v2.img.zsync");
    run(
        Command::new("zsyncmake")
            .current_dir(chan)
            .arg("-u")
            .arg("root-v2.img")
            .arg("-o")
            .arg(&control)
            .arg("root-v2.img"),
        &tools.join("zsyncmake.log"),
    )?;
    let meta = file_len(&control)?;
    // The header lines before the binary checksums: "Blocksize: 2048".
    let head = std::fs::read(&control).with_context(|| format!("reading {control:?}"))?;
    let block = String::from_utf8_lossy(&head[..head.len().min(1024)])
        .lines()
        .find_map(|l| l.strip_prefix("Blocksize: ").map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let out = tools.join("zsync.img");
    srv.ranges.take();
    let t = Instant::now();
    let text = run(
        Command::new("zsync")
            .current_dir(tools)
            .arg("-i")
            .arg(v1)
            .arg("-o")
            .arg(&out)
            .arg(format!(
                "http://{}/{name}/root-v2.img.zsync",
                srv.ranges.addr
            )),
        &tools.join("zsync.log"),
    )?;
    let d = t.elapsed();
    let wire = srv.ranges.take();
    if sha256_file(&out)? != v2.sha256 {
        bail!("zsync's output differs from v2");
    }
    // "used N local, fetched M"
    let fetched = text
        .split("fetched ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("unknown")
        .to_string();
    Ok(format!(
        "zsync_wire_bytes={wire} zsync_fetched_bytes={fetched} zsync_meta_bytes={meta} \
         zsync_blocksize={block} zsync_s={:.2}",
        d.as_secs_f64()
    ))
}

fn casync(
    srv: &Servers,
    chan: &Path,
    tools: &Path,
    name: &str,
    v1: &Path,
    v2: &Payload,
) -> Result<String> {
    if !have("casync") {
        bail!("casync is not installed: apt-get install -y casync");
    }
    let index = chan.join("root-v2.caibx");
    run(
        Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", chan.join("store.castr").display()))
            .arg(&index)
            .arg(&v2.path),
        &tools.join("casync-make.log"),
    )?;
    let meta = file_len(&index)?;
    let out = tools.join("casync.img");
    let base = format!("http://{}/{name}", srv.channel.addr);
    srv.channel.take();
    let t = Instant::now();
    let text = run(
        Command::new("casync")
            .current_dir(tools)
            .arg("--verbose")
            .arg("extract")
            .arg(format!("--store={base}/store.castr"))
            .arg(format!("--seed={}", v1.display()))
            .arg(format!("{base}/root-v2.caibx"))
            .arg(&out),
        &tools.join("casync-extract.log"),
    )?;
    let d = t.elapsed();
    let wire = srv.channel.take();
    if sha256_file(&out)? != v2.sha256 {
        bail!("casync's output differs from v2");
    }
    // "Chunk requests fulfilled from remote store: N (P%)"
    let remote = text
        .lines()
        .find_map(|l| l.strip_prefix("Chunk requests fulfilled from remote store: "))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("unknown")
        .to_string();
    Ok(format!(
        "casync_wire_bytes={wire} casync_chunks_fetched={remote} casync_meta_bytes={meta} \
         casync_s={:.2}",
        d.as_secs_f64()
    ))
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    let s = Settings::from_env()?;
    let blocks = (s.mib * MIB) as usize / BLOCK;
    let parent = if Path::new("/var/tmp").is_dir() {
        PathBuf::from("/var/tmp")
    } else {
        std::env::temp_dir()
    };
    let tmp = tempfile::Builder::new()
        .prefix("caisson-apply-bench.")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a work directory in {parent:?}"))?;
    bench(&format!(
        "setup payload_mib={} blocks={blocks} runs={} cores={} loadavg_start={}",
        s.mib,
        s.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    ));
    let dir = tmp.path().to_path_buf();
    let keys = dir.join("keys");
    let (secret, _, _) = sign::keygen(&keys)?;
    let v1_ids: Vec<u64> = (0..blocks as u64).collect();
    let v1 = write_payload(&dir.join("root-v1.img"), &v1_ids)?;
    // Room for the largest v2 (one inserted block) and headroom, as specs give slots.
    let slot_size = (v1.size + 8 * MIB).div_ceil(MIB) * MIB;
    let www = dir.join("www");
    std::fs::create_dir_all(&www).with_context(|| format!("creating {www:?}"))?;
    let w = Work {
        dir,
        keys,
        secret,
        www,
        slot_size,
        v1,
        boot: None,
    };
    let channel_addr = Server::bind(&w.www, "127.0.0.1:0")?.spawn();
    let srv = Servers {
        channel: Proxy::start(&channel_addr)?,
        ranges: Proxy::start(&serve_multirange(&w.www)?)?,
    };

    if s.throughput {
        throughput(&w, &s, blocks, &channel_addr)?;
    }

    for pct in [1, 10].into_iter().filter(|_| s.delta) {
        let changed = scattered(blocks, (blocks * pct).div_ceil(100), 0xD17A + pct as u64);
        let mut ids = v1_ids.clone();
        for &b in &changed {
            ids[b] = (2 << 40) + (pct as u64) * (1 << 32) + b as u64;
        }
        delta(
            &w,
            &srv,
            &format!("scatter{pct}"),
            &ids,
            changed.len(),
            &s.chunkings,
        )?;
    }
    if s.delta {
        let mut ids = v1_ids.clone();
        ids.insert(blocks / 2, 3 << 40);
        delta(&w, &srv, "insert", &ids, 1, &s.chunkings)?;
    }
    if let Some(dir) = &s.real {
        real(&w, &srv, dir, &s.chunkings)?;
    }

    bench(&format!("done loadavg_end={}", loadavg()));
    drop(w);
    tmp.close().context("removing the work directory")?;
    Ok(())
}
