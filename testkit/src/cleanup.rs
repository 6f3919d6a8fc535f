//! Ctrl-C or SIGTERM in the middle of a run: the processes, namespaces and pins it started
//! are removed before exiting, as at a normal end. Everything that needs removing
//! registers here while it lives: child processes by PID, anything else (a namespace with
//! its pins) by name with the function that removes it, so this module depends on none of
//! its users. Only a program that calls [`install_signal_handlers`] acts on the registry
//! (the benchmark); elsewhere (the tests) owners remove what they started on drop.

use std::sync::{
    Mutex, PoisonError,
    atomic::{AtomicI32, Ordering},
};

use anyhow::bail;

/// Removes the resource of that name.
pub type Remover = fn(&str);

struct Live {
    children: Vec<u32>,
    resources: Vec<(String, Remover)>,
    /// Set once cleanup has begun: what registers later is removed at once.
    shutting_down: bool,
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    children: Vec::new(),
    resources: Vec::new(),
    shutting_down: false,
});

fn live() -> std::sync::MutexGuard<'static, Live> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn signal_pid(pid: u32, signal: libc::c_int) {
    // SAFETY: signalling a child this process started and has not reaped (callers hold
    // the lock, and owners deregister a child before reaping it).
    unsafe { libc::kill(pid as i32, signal) };
}

pub fn child_started(pid: u32) {
    let mut live = live();
    if live.shutting_down {
        signal_pid(pid, libc::SIGKILL);
    } else {
        live.children.push(pid);
    }
}

/// Call before reaping the child: a PID still listed is never a recycled one.
pub fn child_ended(pid: u32) {
    live().children.retain(|&p| p != pid);
}

/// `remove(name)` removes the resource at an interrupt, unless `resource_removed(name)`
/// said it is gone.
pub fn resource_created(name: &str, remove: Remover) {
    let mut live = live();
    if live.shutting_down {
        drop(live);
        remove(name);
    } else {
        live.resources.push((name.to_owned(), remove));
    }
}

pub fn resource_removed(name: &str) {
    live().resources.retain(|(n, _)| n != name);
}

/// Whether `pid` has exited (gone, or a zombie waiting for us), without reaping it.
pub fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

fn clean_up() {
    {
        let mut live = live();
        live.shutting_down = true;
        for &pid in &live.children {
            signal_pid(pid, libc::SIGTERM);
        }
    }
    // A portmap kpscd detaches its programs on SIGTERM: give it the chance.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline && live().children.iter().any(|&p| !exited(p)) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for &pid in &live().children {
        signal_pid(pid, libc::SIGKILL);
    }
    // Unlocked while removing: removers report back through resource_removed.
    let resources = live().resources.clone();
    for (name, remove) in resources {
        remove(&name);
    }
}

/// Write end of the pipe the signal handler reports on.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; the descriptor stays open for the process.
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&raw const byte).cast(),
            1,
        )
    };
}

/// Routes SIGINT and SIGTERM to a thread that cleans up and exits with 128 + signal;
/// `program` names the process in the message it prints.
/// A handler rather than a blocked mask: children would inherit the mask across exec
/// and ignore the SIGTERM that stops them, while handlers are reset by exec.
pub fn install_signal_handlers(program: &'static str) -> anyhow::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!(
            "creating the signal pipe: {}",
            std::io::Error::last_os_error()
        );
    }
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs an async-signal-safe handler; the zeroed sigaction has an
        // empty mask and no flags but SA_RESTART, set below.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if installed != 0 {
            bail!(
                "installing the handler for signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let read_end = fds[0];
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut byte = 0u8;
            loop {
                // SAFETY: reads one byte into a local from the pipe this thread owns.
                match unsafe { libc::read(read_end, (&raw mut byte).cast(), 1) } {
                    1 => break,
                    -1 if std::io::Error::last_os_error().kind()
                        == std::io::ErrorKind::Interrupted => {}
                    _ => return,
                }
            }
            // A second Ctrl-C during the cleanup stops at once.
            for signal in [libc::SIGINT, libc::SIGTERM] {
                // SAFETY: restores the default disposition.
                unsafe { libc::signal(signal, libc::SIG_DFL) };
            }
            let signal = i32::from(byte);
            eprintln!(
                "{program}: interrupted (signal {signal}); removing what this run started \
                 (interrupt again to stop at once)"
            );
            clean_up();
            std::process::exit(128 + signal);
        })?;
    Ok(())
}
