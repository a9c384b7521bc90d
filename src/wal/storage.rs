//! All file I/O of the log goes through [`Storage`] and [`SegmentFile`], so
//! tests can swap in a backend that keeps a "live" and a "durable" image and
//! crashes between them (`sim.rs`), and so failpoints have one place to live.
//!
//! The real backend, [`DirStorage`], keeps segments as preallocated files
//! mapped with memmap2. Preallocation (`posix_fallocate`) matters: writing
//! through a mapping into a sparse file on a full disk is a SIGBUS, while a
//! failed preallocation is an ordinary error at segment creation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use memmap2::MmapRaw;

/// A directory of named files.
pub(crate) trait Storage: Send + Sync + 'static {
    /// File names in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// A whole file's bytes (mapped where possible: replay reads the log
    /// twice and copies nothing).
    fn read(&self, name: &str) -> io::Result<Bytes>;
    /// The first `len` bytes of a file, copied (for a segment that is being
    /// appended to: bytes past `len` may be changing).
    fn read_prefix(&self, name: &str, len: usize) -> io::Result<Vec<u8>> {
        let bytes = self.read(name)?;
        Ok(bytes.get(..len).unwrap_or(&bytes).to_vec())
    }
    /// `len` bytes of a file from `offset` (fewer at its end), copied.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    fn read_range(&self, name: &str, offset: usize, len: usize) -> io::Result<Vec<u8>> {
        let bytes = self.read(name)?;
        let start = offset.min(bytes.len());
        let end = start.saturating_add(len).min(bytes.len());
        Ok(bytes[start..end].to_vec())
    }
    /// Create or replace `name` atomically and durably (write a temporary
    /// file, sync it, rename it over, sync the directory).
    fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// Create a new preallocated segment of `size` bytes starting with
    /// `header`, durably, and open it for appending in `mode`.
    fn create_segment(
        &self,
        name: &str,
        size: usize,
        header: &[u8],
        mode: WriteMode,
    ) -> io::Result<Box<dyn SegmentFile>> {
        self.prepare_segment(name, size, header, mode)?;
        self.install_segment(name, mode)
    }
    /// The slow half of [`Storage::create_segment`], ahead of time: the
    /// segment as a temporary file, preallocated (and zero-filled where
    /// `mode` wants it), its header durable. Not part of the store (the
    /// next open removes it) until installed.
    fn prepare_segment(
        &self,
        name: &str,
        size: usize,
        header: &[u8],
        mode: WriteMode,
    ) -> io::Result<()>;
    /// Put a prepared segment in place, durably, and open it for appending.
    fn install_segment(&self, name: &str, mode: WriteMode) -> io::Result<Box<dyn SegmentFile>>;
    /// Remove a prepared segment that will not be installed.
    fn discard_prepared(&self, name: &str);
    /// Open an existing segment for appending in `mode`.
    fn open_segment(&self, name: &str, mode: WriteMode) -> io::Result<Box<dyn SegmentFile>>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// For error messages.
    fn path(&self, name: &str) -> PathBuf;
}

/// A file's contents, owned or mapped read-only.
pub(crate) enum Bytes {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m) => m,
        }
    }
}

/// How records reach a segment file (see `docs/design.md`, "The write
/// path"). Both put them in the page cache before the append returns, so
/// both survive the process being killed; they differ in what a sync costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// Copied into a shared mapping (no system call per append); `msync`.
    /// Dirtying pages through a mapping makes each sync about twice as
    /// expensive, so only engines that rarely sync use it.
    Mapped,
    /// Copied into an in-memory staging buffer (no system call per
    /// append); a sync `pwrite`s the staged range and `fdatasync`s. For
    /// `Durability::Sync`, where every call waits for a sync anyway: a
    /// record not yet written was not acknowledged either.
    Staged,
    /// Written to the file with `pwrite` by each append (a system call per
    /// append; in the page cache when the append returns, so it survives
    /// the process being killed); a sync is an `fdatasync`. For
    /// `Durability::Periodic`: its background sync then costs what the
    /// disk charges, not the mapping's writeback.
    Written,
}

/// One segment, open for appending. Writers hold disjoint reserved ranges.
pub(crate) trait SegmentFile: Send + Sync {
    fn len(&self) -> usize;
    /// Write `bytes` at `offset`. The caller owns `offset..offset + len`
    /// exclusively (it reserved it).
    fn write_at(&self, offset: usize, bytes: &[u8]) -> io::Result<()>;
    /// Make `offset..offset + len` durable (it may make more durable).
    fn sync(&self, offset: usize, len: usize) -> io::Result<()>;
    /// Start writing `offset..offset + len` (already written) out to the
    /// disk without waiting for it, so a later `sync` has less to do. A
    /// hint: nothing is promised, and errors are left to that `sync`.
    fn start_writeback(&self, _offset: usize, _len: usize) {}
    /// Durably zero `offset..offset + len` of the file itself (recovery
    /// cutting a torn tail, before any append).
    fn zero_range(&self, offset: usize, len: usize) -> io::Result<()> {
        self.write_at(offset, &vec![0u8; len])?;
        self.sync(offset, len)
    }
}

/// Segments as mapped, preallocated files in a directory.
pub(crate) struct DirStorage {
    dir: PathBuf,
    /// Reads map files (only safe with the directory lock held: nobody
    /// else changes them underneath the mapping).
    mapped_reads: bool,
}

impl DirStorage {
    /// Use `dir`, creating it (mode 0700) if needed.
    pub(crate) fn open(dir: &Path) -> io::Result<DirStorage> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Ok(DirStorage {
            dir: dir.to_path_buf(),
            mapped_reads: true,
        })
    }

    /// Look at an existing directory without its lock (inspect, verify):
    /// reads copy files instead of mapping them, since another process may
    /// be appending.
    pub(crate) fn unlocked(dir: &Path) -> io::Result<DirStorage> {
        if !dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such state directory",
            ));
        }
        Ok(DirStorage {
            dir: dir.to_path_buf(),
            mapped_reads: false,
        })
    }

    fn sync_dir(&self) -> io::Result<()> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("wal::sync_dir", |_| Err(io::Error::other(
            "failpoint wal::sync_dir"
        )));
        File::open(&self.dir)?.sync_all()
    }

    fn prepared_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.tmp"))
    }

    fn new_file(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    }
}

/// Zero-filled bytes written back at a time while a segment is made
/// through the page cache (where `O_DIRECT` is not supported).
const ZERO_FILL_FLUSH: usize = 2 << 20;
/// Zeros written per `O_DIRECT` write while a segment is made.
const ZERO_CHUNK: usize = 256 << 10;
/// Pause between two of them.
const ZERO_PAUSE: std::time::Duration = std::time::Duration::from_micros(200);

fn preallocate(file: &File, path: &Path, size: usize, mode: WriteMode) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("wal::preallocate", |_| Err(io::Error::from_raw_os_error(
        libc::ENOSPC
    )));
    use std::os::fd::AsRawFd;
    #[allow(unsafe_code)]
    // SAFETY: a plain syscall on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t) };
    if rc == 0 && matches!(mode, WriteMode::Mapped | WriteMode::Written) {
        // Leave the extents "unwritten". A page dirtied through a shared
        // mapping over written zeros costs each msync filesystem work a
        // pwrite does not (measured: zero-filled 1.1-1.5 ms per 32 KB sync,
        // fallocated 0.41-0.46 ms). `Written` syncs in the background, where
        // converting extents costs nothing a caller waits for, while writing
        // 64 MiB of zeros stalled the append that rolled the segment over
        // for 160-250 ms.
        return Ok(());
    }
    if rc == 0 || rc == libc::EOPNOTSUPP || rc == libc::EINVAL {
        // fallocate reserves the blocks (so a full disk fails here, not as a
        // SIGBUS in the mapping), but leaves them "unwritten": every sync
        // that touches one would then convert extents in a journal commit.
        // Writing real zeros once makes later pwrite+fdatasync syncs pure
        // data writes.
        let done = zero_fill_direct(path, size)?;
        zero_fill_buffered(file, done, size)?;
        file.sync_data()
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Write zeros over `0..size` of the file at `path` with `O_DIRECT`, in
/// small paced writes; returns how far it got (0 where the filesystem
/// does not take `O_DIRECT`, as tmpfs does not).
///
/// Segments are made while the active one takes syncs, and every byte of
/// zeros competes with them for the disk. Through the page cache, zeros
/// went to the disk in bursts that the syncs queued behind, and copying
/// them cost CPU the writers wanted. Measured on the 2-vCPU guest, 400
/// syncs of a 43 KB `pwrite` + `fdatasync` while another thread zero-fills
/// without end: through the cache (flushed every 2 MiB), mean 638-790 us
/// and p99 2.5-2.8 ms; direct, 256 KiB per write with 200 us between, mean
/// 391-397 us and p99 1.0-1.2 ms, still filling 360 MB/s (alone: mean
/// 164-186 us). A slower pace disturbs less (1 ms: mean 253-284 us) but
/// fills 150 MB/s, slower than a doubling segment must be filled at a
/// few M marks/s, and a rollover would then wait for it.
fn zero_fill_direct(path: &Path, size: usize) -> io::Result<usize> {
    let direct = match open_direct(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(0),
        Err(e) => return Err(e),
    };
    // Anonymous memory: page-aligned and zero, as O_DIRECT wants.
    let zeros = memmap2::MmapMut::map_anon(ZERO_CHUNK)?;
    let whole = size / ZERO_CHUNK * ZERO_CHUNK;
    let mut at = 0;
    while at < whole {
        match direct.write_all_at(&zeros, at as u64) {
            Ok(()) => at += ZERO_CHUNK,
            // Not supported after all (the open can succeed where writes
            // then fail): the page cache takes the rest.
            Err(e) if at == 0 && e.raw_os_error() == Some(libc::EINVAL) => return Ok(0),
            Err(e) => return Err(e),
        }
        std::thread::sleep(ZERO_PAUSE);
    }
    Ok(at)
}

/// `path` opened for writing with `O_DIRECT` (refused with `EINVAL` where
/// the filesystem has no direct I/O).
fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Write zeros over `from..size` through the page cache.
fn zero_fill_buffered(file: &File, from: usize, size: usize) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < size {
        let n = zeros.len().min(size - at);
        file.write_all_at(&zeros[..n], at as u64)?;
        at += n;
        // Flushed a few MiB at a time: 64 MiB written back in one burst
        // queued the active segment's syncs behind it.
        if at % ZERO_FILL_FLUSH == 0 {
            file.sync_data()?;
        }
    }
    Ok(())
}

impl Storage for DirStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            } else {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Bytes> {
        if !self.mapped_reads {
            return fs::read(self.dir.join(name)).map(Bytes::Owned);
        }
        let file = File::open(self.dir.join(name))?;
        if file.metadata()?.len() == 0 {
            return Ok(Bytes::Owned(Vec::new()));
        }
        #[allow(unsafe_code)]
        // SAFETY: the store's directory lock is held, so no other process
        // writes or truncates its files, and this process only writes
        // segments through their own mappings at offsets past what recovery
        // reads. The mapping is read-only and dropped after recovery.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Bytes::Mapped(map))
    }

    fn read_prefix(&self, name: &str, len: usize) -> io::Result<Vec<u8>> {
        let file = File::open(self.dir.join(name))?;
        let len = len.min(file.metadata()?.len() as usize);
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    fn read_range(&self, name: &str, offset: usize, len: usize) -> io::Result<Vec<u8>> {
        let file = File::open(self.dir.join(name))?;
        let size = file.metadata()?.len() as usize;
        let start = offset.min(size);
        let len = len.min(size - start);
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, start as u64)?;
        Ok(buf)
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut f = Self::new_file(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        #[cfg(feature = "failpoints")]
        fail::fail_point!("wal::rename", |_| Err(io::Error::other(
            "failpoint wal::rename"
        )));
        fs::rename(&tmp, self.dir.join(name))?;
        self.sync_dir()
    }

    fn prepare_segment(
        &self,
        name: &str,
        size: usize,
        header: &[u8],
        mode: WriteMode,
    ) -> io::Result<()> {
        let tmp = self.prepared_path(name);
        let _ = fs::remove_file(&tmp);
        let file = Self::new_file(&tmp)?;
        let result = (|| {
            preallocate(&file, &tmp, size, mode)?;
            #[cfg(feature = "failpoints")]
            fail::fail_point!("wal::write", |_| Err(io::Error::other(
                "failpoint wal::write"
            )));
            file.write_all_at(header, 0)?;
            file.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn install_segment(&self, name: &str, mode: WriteMode) -> io::Result<Box<dyn SegmentFile>> {
        let tmp = self.prepared_path(name);
        let result = (|| {
            #[cfg(feature = "failpoints")]
            fail::fail_point!("wal::rename", |_| Err(io::Error::other(
                "failpoint wal::rename"
            )));
            fs::rename(&tmp, self.dir.join(name))?;
            self.sync_dir()
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.open_segment(name, mode)
    }

    fn discard_prepared(&self, name: &str) {
        let _ = fs::remove_file(self.prepared_path(name));
    }

    fn open_segment(&self, name: &str, mode: WriteMode) -> io::Result<Box<dyn SegmentFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(name))?;
        // Keep 0600 even if someone loosened it.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        segment_file(file, &self.dir.join(name), mode)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.dir.join(name))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn segment_file(file: File, path: &Path, mode: WriteMode) -> io::Result<Box<dyn SegmentFile>> {
    Ok(match mode {
        WriteMode::Mapped => Box::new(MappedSegment::new(file)?),
        WriteMode::Written => {
            let len = file.metadata()?.len() as usize;
            Box::new(WrittenSegment { file, len })
        }
        WriteMode::Staged => {
            let len = file.metadata()?.len() as usize;
            Box::new(StagedSegment {
                // Anonymous memory: pages are only taken as records land.
                staged: memmap2::MmapMut::map_anon(len.max(1))?,
                // Where the filesystem takes it.
                direct: open_direct(path).ok(),
                file,
                len,
                progress: parking_lot::Mutex::new(StagedProgress::default()),
            })
        }
    })
}

/// The page size `madvise` works in (4 KiB on every platform we build for;
/// a larger real page only makes the advice cover less).
const STAGED_PAGE: usize = 4096;
/// A staged sync's `O_DIRECT` write (a failpoint can refuse it, as a
/// filesystem that wants a larger alignment would).
fn direct_write(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    if fail::eval("wal::odirect", |_| ()).is_some() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    file.write_all_at(bytes, offset)
}

/// Bytes a staged sync copies and writes at a time.
const BOUNCE: usize = 1 << 20;
/// Staged bytes handed back at a time.
const RELEASE_STEP: usize = 1 << 20;

/// A segment whose appends are staged in memory and written with `pwrite`
/// at sync time, then made durable with `fdatasync`.
struct StagedSegment {
    staged: memmap2::MmapMut,
    file: File,
    /// The same file opened with `O_DIRECT`, for syncs of whole pages.
    direct: Option<File>,
    len: usize,
    /// Syncs of one segment (the group commit's and the seal at rollover)
    /// take turns, so none writes staged bytes another has handed back.
    progress: parking_lot::Mutex<StagedProgress>,
}

/// How far a staged segment has gone, from its start (syncs always cover
/// a prefix: everything published).
#[derive(Default)]
struct StagedProgress {
    /// Bytes before this were written to the file.
    written: usize,
    /// ...and made durable.
    durable: usize,
    /// Staged pages before this were handed back to the system.
    released: usize,
    /// Where the first sync started: the staging buffer holds what the
    /// file holds only from here on (before it are the header, and the
    /// records of an earlier process, which were never staged).
    base: Option<usize>,
    /// Page-aligned copy of what a sync writes, BOUNCE bytes at a time:
    /// the staged bytes, then zeros to the end of the page.
    bounce: Option<memmap2::MmapMut>,
    /// An `O_DIRECT` write was refused: the page cache takes them all.
    direct_refused: bool,
}

impl SegmentFile for StagedSegment {
    fn len(&self) -> usize {
        self.len
    }

    #[allow(unsafe_code)]
    fn write_at(&self, offset: usize, bytes: &[u8]) -> io::Result<()> {
        if !matches!(offset.checked_add(bytes.len()), Some(end) if end <= self.len) {
            return Err(io::Error::other("write past the end of a segment"));
        }
        // SAFETY: in bounds (checked above) of an anonymous mapping we own;
        // the caller reserved this range exclusively, so no other thread
        // writes it, and `sync` reads only ranges whose writers have all
        // published (finished copying).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.staged.as_ptr().cast_mut().add(offset),
                bytes.len(),
            );
        }
        Ok(())
    }

    #[allow(unsafe_code)]
    fn sync(&self, offset: usize, len: usize) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| io::Error::other("sync past the end of a segment"))?;
        let mut p = self.progress.lock();
        if p.durable >= end {
            return Ok(());
        }
        if end > p.written {
            #[cfg(feature = "failpoints")]
            fail::fail_point!("wal::pwrite", |_| Err(io::Error::other(
                "failpoint wal::pwrite"
            )));
            // Whole pages: from the start of the page holding `written`
            // (still staged: only pages before it were handed back; but
            // never before `base`, below which the staging buffer holds
            // zeros, not the file's header and records), and padded with
            // zeros to the end of the page holding `end` (what the
            // zero-filled file holds there). Whole pages go to the disk
            // with `O_DIRECT`: measured on the 2-vCPU guest's virtio disk,
            // a direct 48 KB write then `fdatasync` took 157-181 us (p50)
            // against 201-216 us through the page cache. And a write
            // through the cache that ended inside a page not cached (the
            // zero fill bypasses the cache) would first read that page
            // from the disk, inside the sync.
            let start = p.written.max(offset);
            let base = *p.base.get_or_insert(start);
            let from = (start / STAGED_PAGE * STAGED_PAGE).max(base);
            let padded_end = end.next_multiple_of(STAGED_PAGE).min(self.len);
            let aligned = from % STAGED_PAGE == 0 && padded_end % STAGED_PAGE == 0;
            let direct = self.direct.as_ref().filter(|_| aligned);
            let StagedProgress {
                bounce,
                direct_refused,
                ..
            } = &mut *p;
            let bounce = match bounce {
                Some(b) => b,
                slot => slot.insert(memmap2::MmapMut::map_anon(BOUNCE)?),
            };
            // SAFETY: `from..end` is in bounds, not handed back (`from` is
            // at or past the first page not released), and fully
            // published: every writer of it has finished, and none writes
            // it again.
            let staged =
                unsafe { std::slice::from_raw_parts(self.staged.as_ptr().add(from), end - from) };
            // BOUNCE at a time (a multiple of the page), so the copy costs
            // at most that much memory however large the sync.
            let mut at = 0;
            while from + at < padded_end {
                let n = BOUNCE.min(padded_end - from - at);
                let chunk = &mut bounce[..n];
                let have = staged.len().saturating_sub(at).min(n);
                chunk[..have].copy_from_slice(&staged[at..at + have]);
                chunk[have..].fill(0);
                let offset = (from + at) as u64;
                match direct {
                    Some(d) if !*direct_refused => match direct_write(d, chunk, offset) {
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            // Refused (alignment the filesystem wants
                            // larger than a page, or no direct I/O after
                            // all): the cache takes this write and every
                            // later one.
                            tracing::debug!(error = %e, "seen: O_DIRECT log write refused");
                            *direct_refused = true;
                            self.file.write_all_at(chunk, offset)?;
                        }
                        other => other?,
                    },
                    _ => self.file.write_all_at(chunk, offset)?,
                }
                at += n;
            }
            p.written = end;
        }
        #[cfg(feature = "failpoints")]
        fail::fail_point!("wal::msync", |_| Err(io::Error::other(
            "failpoint wal::msync"
        )));
        self.file.sync_data()?;
        p.durable = end;
        // Whole pages before `written` are in the file for good: give them
        // back, so a segment's staging costs a few pages, not its size.
        let upto = p.written / STAGED_PAGE * STAGED_PAGE;
        // In steps of at least RELEASE_STEP: each `madvise` flushes the
        // TLBs of the other threads' CPUs, which costs more than the pages.
        if upto >= p.released + RELEASE_STEP {
            // SAFETY: advice on whole pages of our own mapping that no one
            // reads or writes again (appends only go forward, syncs only
            // read from the page holding `written` on).
            unsafe {
                libc::madvise(
                    self.staged.as_ptr().add(p.released).cast_mut().cast(),
                    upto - p.released,
                    libc::MADV_DONTNEED,
                );
            }
            p.released = upto;
        }
        Ok(())
    }

    fn zero_range(&self, offset: usize, len: usize) -> io::Result<()> {
        // Straight to the file: the staging buffer is still all zeros, and
        // the appends that follow will write this range again.
        self.file.write_all_at(&vec![0u8; len], offset as u64)?;
        self.file.sync_data()
    }
}

/// A segment whose appends are each written to the file with `pwrite`.
struct WrittenSegment {
    file: File,
    len: usize,
}

impl SegmentFile for WrittenSegment {
    fn len(&self) -> usize {
        self.len
    }

    fn write_at(&self, offset: usize, bytes: &[u8]) -> io::Result<()> {
        if !matches!(offset.checked_add(bytes.len()), Some(end) if end <= self.len) {
            return Err(io::Error::other("write past the end of a segment"));
        }
        #[cfg(feature = "failpoints")]
        fail::fail_point!("wal::pwrite", |_| Err(io::Error::other(
            "failpoint wal::pwrite"
        )));
        self.file.write_all_at(bytes, offset as u64)
    }

    fn sync(&self, _offset: usize, _len: usize) -> io::Result<()> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("wal::msync", |_| Err(io::Error::other(
            "failpoint wal::msync"
        )));
        self.file.sync_data()
    }
    // No writeback hints: `Periodic`'s flusher syncs every few ms, so a
    // hint would mostly duplicate its work (measured: nothing clear to
    // gain, and a system call on a writer's thread).
}

/// A segment file mapped read-write.
struct MappedSegment {
    map: MmapRaw,
    file: File,
}

impl MappedSegment {
    fn new(file: File) -> io::Result<MappedSegment> {
        let map = MmapRaw::map_raw(&file)?;
        Ok(MappedSegment { map, file })
    }
}

/// Appends of at least this many bytes (a batch's chunk of 128+ records)
/// go through `pwrite` rather than the mapping: the system call is small
/// beside the chunk, while every page dirtied through a shared mapping
/// costs its writeback a write-protect fault and a TLB shootdown (an msync
/// of ~3.5 MB took 20-31 ms here, against 1-3 ms for `fdatasync` after
/// `pwrite`). Single ids keep the copy into the mapping: a `pwrite` each
/// cost them 18 % of their throughput. Both paths write the same page
/// cache pages, so either survives `kill -9` once the append returns.
const PWRITE_FROM: usize = 4096;

impl SegmentFile for MappedSegment {
    fn len(&self) -> usize {
        self.map.len()
    }

    #[allow(unsafe_code)]
    fn write_at(&self, offset: usize, bytes: &[u8]) -> io::Result<()> {
        if !matches!(offset.checked_add(bytes.len()), Some(end) if end <= self.map.len()) {
            return Err(io::Error::other("write past the end of a segment"));
        }
        if bytes.len() >= PWRITE_FROM {
            return self.file.write_all_at(bytes, offset as u64);
        }
        // SAFETY: in bounds (checked above) of a live mapping we own; the
        // caller reserved this range exclusively, so no other thread writes
        // it, and nothing reads it through a Rust reference (recovery reads
        // files, not this mapping). The file was preallocated, so the store
        // cannot fault for lack of disk blocks.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                bytes.len(),
            );
        }
        Ok(())
    }

    fn sync(&self, offset: usize, len: usize) -> io::Result<()> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("wal::msync", |_| Err(io::Error::other(
            "failpoint wal::msync"
        )));
        self.map.flush_range(offset, len)
    }

    fn start_writeback(&self, offset: usize, len: usize) {
        start_writeback(&self.file, offset, len);
    }
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: queue the range's dirty pages
/// (written through a mapping or with `pwrite`) for writeback and return.
/// (`msync(MS_ASYNC)` does nothing on Linux.)
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &File, offset: usize, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on an open descriptor we own; it reads
    // no memory of ours.
    let r = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if r != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "seen: writeback hint refused");
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: usize, _len: usize) {}

/// An exclusive `flock` on the directory's LOCK file, held while a store is
/// open. A second process — or a second open in this process, since flock
/// locks belong to the open file description — is refused.
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// `Ok(None)` if someone else holds the lock.
    pub(crate) fn try_lock(path: &Path) -> io::Result<Option<DirLock>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        use std::os::fd::AsRawFd;
        #[allow(unsafe_code)]
        // SAFETY: a plain syscall on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            Ok(Some(DirLock { _file: file }))
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}
