//! cgroup v2 for eBPF-mode tests: a scratch cgroup (the socket-LB programs attach to it, so
//! only processes placed in it are translated) and [`in_cgroup`], which runs a client in a
//! child process inside that cgroup and a network namespace. cgroup membership is per
//! process, and tests share one process: a forked child is the unit that can join.

use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The cgroup2 mount point (from /proc/self/mountinfo).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or_else(|| io::Error::other("no cgroup2 file system is mounted"))
}

/// Where eBPF-mode tests keep their pins and cgroups: a bpffs and a cgroup2 mount under
/// /run, made once per boot (under a lock, as tests and proxies run in parallel). Not
/// /sys: `ip netns exec`, which starts the test kit's proxies, remounts /sys, hiding the
/// host's /sys/fs/bpf and /sys/fs/cgroup; /run stays visible, and a cgroup2 mount shows the
/// one cgroup2 hierarchy wherever it is mounted.
pub fn bpf_test_mounts() -> io::Result<(PathBuf, PathBuf)> {
    let base = Path::new("/run/svcplane-test-bpf");
    let (bpffs, cgroup2) = (base.join("bpffs"), base.join("cgroup2"));
    std::fs::create_dir_all(&bpffs)?;
    std::fs::create_dir_all(&cgroup2)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(base.join("lock"))?;
    // SAFETY: flock on an fd we own; released when `lock` closes.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    for (dir, fstype, magic) in [
        (&bpffs, "bpf", 0xcafe_4a11_i64),
        (&cgroup2, "cgroup2", 0x6367_7270),
    ] {
        if fs_magic(dir)? != magic {
            crate::run_checked(
                std::process::Command::new("mount")
                    .args(["-t", fstype, fstype])
                    .arg(dir),
            )?;
        }
    }
    Ok((bpffs, cgroup2))
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// A scratch cgroup (under [`bpf_test_mounts`]'s cgroup2 mount), removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Create `<root>/<prefix>-<pid>-<n>`.
    pub fn new(prefix: &str) -> io::Result<Cgroup> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let (_, root) = bpf_test_mounts()?;
        let path = root.join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Cgroup {
    /// Move this whole process (every thread) into the cgroup until the returned guard is
    /// dropped, which moves it back. For a program of its own such as `svcplane bench`,
    /// whose sockets must be translated; never in a test (tests share one process: use
    /// [`in_cgroup`]).
    pub fn enter(&self) -> io::Result<CgroupMember<'_>> {
        let (_, root) = bpf_test_mounts()?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        // cgroup v2: the line `0::/path`.
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| io::Error::other("this process is in no cgroup v2 cgroup"))?;
        let back = root.join(rel.trim_start_matches('/'));
        std::fs::write(self.path.join("cgroup.procs"), "0\n")?;
        Ok(CgroupMember {
            _cgroup: self,
            back,
        })
    }
}

/// This process inside a [`Cgroup`] (see [`Cgroup::enter`]); back where it was on drop.
#[derive(Debug)]
pub struct CgroupMember<'a> {
    _cgroup: &'a Cgroup,
    back: PathBuf,
}

impl Drop for CgroupMember<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(self.back.join("cgroup.procs"), "0\n");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Children were reaped, so it is empty; attached programs go with it.
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// How long [`in_cgroup`] waits for its child before killing it: a client that hangs
/// must fail its test, not stall the suite.
pub const IN_CGROUP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Run `f` in a forked child that first joins `cgroup`, then enters network namespace
/// `netns` (a name under /run/netns); returns the string `f` returned. Sockets `f` opens
/// belong to the cgroup, so programs attached there see them.
///
/// The result pipe is close-on-exec: without it, a process another test thread spawns
/// meanwhile (a proxy) inherits the write end and the read below never sees EOF until
/// that process exits (CI hung 85 minutes on exactly that). The read has a deadline too.
pub fn in_cgroup(cgroup: &Path, netns: &str, f: impl FnOnce() -> String) -> io::Result<String> {
    let procs = std::ffi::CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(io::Error::other)?;
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the child only joins the cgroup and namespace, runs `f` (sockets and
    // allocation: glibc's malloc is fork-safe), writes the pipe and _exits; a panic in `f`
    // is caught so it never unwinds into the test harness' code in the child.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            libc::close(fds[0]);
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            let ok = fd >= 0
                && libc::write(fd, b"0\n".as_ptr().cast(), 2) == 2
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) == 0;
            let (out, ok) = if ok {
                crate::net::settle_in_netns(netns);
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                    Ok(out) => (out, true),
                    Err(_) => ("in_cgroup: the client panicked".to_owned(), false),
                }
            } else {
                (format!("in_cgroup: {}", io::Error::last_os_error()), false)
            };
            let mut pipe = std::fs::File::from_raw_fd(fds[1]);
            let _ = pipe.write_all(out.as_bytes());
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    // SAFETY: we own the read end.
    let pipe = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    unsafe { libc::close(fds[1]) };
    let read = read_until_eof(pipe, IN_CGROUP_DEADLINE);
    if read.is_err() {
        // SAFETY: our own child; it is reaped below.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let out = read?;
    if status != 0 {
        return Err(io::Error::other(out));
    }
    Ok(out)
}

/// Read `pipe` to EOF, giving up after `deadline`.
fn read_until_eof(mut pipe: std::fs::File, deadline: std::time::Duration) -> io::Result<String> {
    let until = std::time::Instant::now() + deadline;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        let ready =
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if ready == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("in_cgroup: the client gave no answer within {deadline:?}"),
            ));
        }
        match pipe.read(&mut buf)? {
            0 => return String::from_utf8(bytes).map_err(io::Error::other),
            n => bytes.extend_from_slice(&buf[..n]),
        }
    }
}
