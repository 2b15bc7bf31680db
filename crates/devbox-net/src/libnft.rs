//! nftables in process: libnftables, the library the `nft` command is built on, loaded at
//! run time (`libnftables.so.1`, installed with nftables). A sandbox's table loads in about
//! 1 ms this way against 10 ms and more for an `nft` process (most of it the process and
//! the library's start-up), which is most of what a network adds to `sandbox run`.
//! `DEVBOX_NET_NFT=command` makes the daemon use the `nft` command instead.
//!
//! A context is made once and kept (making one costs ~10 ms: it reads the system's
//! protocol and service tables); it belongs to the network namespace of the thread that
//! made it, so the one kept is replaced when a call comes from another namespace (the
//! daemon has one; tests switch). Calls are serialised (a context is not thread-safe).
//!
//! The crate's one OS boundary with `unsafe`: the library's C functions.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, OnceLock};

/// `NFT_CTX_DEFAULT` of libnftables.h.
const NFT_CTX_DEFAULT: u32 = 0;
/// `NFT_CTX_OUTPUT_JSON` of libnftables.h.
const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxStr = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type Run = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

struct Lib {
    new: CtxNew,
    free: CtxFree,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    output: CtxStr,
    error: CtxStr,
    set_flags: SetFlags,
    run: Run,
    /// Keeps the functions above loaded.
    _lib: libloading::Library,
}

fn load() -> Result<Lib, libloading::Error> {
    // SAFETY: loading libnftables runs no initialisers with preconditions of ours; the
    // symbols are taken with the C signatures of libnftables.h (stable since 0.9), and the
    // library stays loaded as long as `Lib` (its `_lib`), which holds the pointers.
    unsafe {
        let lib = libloading::Library::new("libnftables.so.1")?;
        Ok(Lib {
            new: *lib.get::<CtxNew>(b"nft_ctx_new\0")?,
            free: *lib.get::<CtxFree>(b"nft_ctx_free\0")?,
            buffer_output: *lib.get::<CtxInt>(b"nft_ctx_buffer_output\0")?,
            buffer_error: *lib.get::<CtxInt>(b"nft_ctx_buffer_error\0")?,
            output: *lib.get::<CtxStr>(b"nft_ctx_get_output_buffer\0")?,
            error: *lib.get::<CtxStr>(b"nft_ctx_get_error_buffer\0")?,
            set_flags: *lib.get::<SetFlags>(b"nft_ctx_output_set_flags\0")?,
            run: *lib.get::<Run>(b"nft_run_cmd_from_buffer\0")?,
            _lib: lib,
        })
    }
}

fn lib() -> Option<&'static Lib> {
    static LIB: OnceLock<Option<Lib>> = OnceLock::new();
    LIB.get_or_init(|| {
        if std::env::var("DEVBOX_NET_NFT").is_ok_and(|v| v == "command") {
            tracing::info!("DEVBOX_NET_NFT=command: rules go through the nft command");
            return None;
        }
        load()
            .inspect_err(|e| {
                tracing::info!("libnftables not loaded ({e}): rules go through the nft command")
            })
            .ok()
    })
    .as_ref()
}

/// A context and the network namespace (inode) it was made in.
struct Ctx {
    ns: u64,
    ptr: *mut c_void,
}

// SAFETY: a context is used by one thread at a time (behind `CTX`'s mutex); libnftables
// keeps no thread-local state of its own.
unsafe impl Send for Ctx {}

static CTX: Mutex<Option<Ctx>> = Mutex::new(None);

/// The network namespace of the calling thread.
fn current_ns() -> Option<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

/// Runs `commands` (an nft script; one transaction) in the calling thread's network
/// namespace; with `json`, the output is JSON. `None`: the library is not there (use the
/// command). `Some(Err)`: nft's error text.
pub(crate) fn run(commands: &str, json: bool) -> Option<Result<String, String>> {
    let lib = lib()?;
    let ns = current_ns()?;
    let text = match CString::new(commands) {
        Ok(t) => t,
        Err(_) => return Some(Err("the nft script contains a NUL byte".into())),
    };
    let mut slot = CTX.lock().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_some_and(|c| c.ns != ns)
        && let Some(old) = slot.take()
    {
        // SAFETY: the context was made by `lib.new` and nothing else holds it.
        unsafe { (lib.free)(old.ptr) };
    }
    if slot.is_none() {
        // SAFETY: plain constructor; a null return is handled.
        let ptr = unsafe { (lib.new)(NFT_CTX_DEFAULT) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: `ptr` is a live context; buffering makes output and errors readable
        // through the get functions instead of going to stdout/stderr.
        let buffered = unsafe { (lib.buffer_output)(ptr) == 0 && (lib.buffer_error)(ptr) == 0 };
        if !buffered {
            // SAFETY: made above, used by nothing else.
            unsafe { (lib.free)(ptr) };
            return None;
        }
        *slot = Some(Ctx { ns, ptr });
    }
    let ctx = slot.as_ref()?.ptr;
    // SAFETY: `ctx` is live and ours (the mutex is held); `text` is NUL-terminated and
    // outlives the call; the buffers returned are owned by the context, valid until its next
    // call, and copied out before the mutex is released.
    unsafe {
        (lib.set_flags)(ctx, if json { NFT_CTX_OUTPUT_JSON } else { 0 });
        let rc = (lib.run)(ctx, text.as_ptr());
        let read = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let out = read((lib.output)(ctx));
        let err = read((lib.error)(ctx));
        Some(if rc == 0 {
            Ok(out)
        } else {
            Err(err.trim().to_string())
        })
    }
}
