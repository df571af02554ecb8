//! What keeps a guest escape from being root on the host.
//!
//! Every QEMU runs under QEMU's seccomp filter (`-sandbox on`) with process creation denied:
//! it can never run a program, so nothing it is asked to do (an `exec:` migration URI, a TAP
//! `script=`) may need one. Where the VM's spec names a user, QEMU opens its files, devices and
//! sockets as the caller (root, for an agent) and then becomes that user (`-runas`) before the
//! guest runs a single instruction; after that it holds only the descriptors it opened and the
//! rights of an unprivileged user.
//!
//! So the things a VM needs later come to it as descriptors: its TAP is created and attached to
//! the bridge here and inherited by QEMU (`-netdev tap,fd=N`); a saved state goes out and comes
//! back through a file this process opens and passes over QMP (`getfd`, then `fd:` URIs).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::error::{Result, VmmError};

/// `-sandbox`'s value. Privilege changes stay allowed only where QEMU drops to another user
/// itself (`-runas` calls setuid after the filter is installed; with `deny` QEMU dies of
/// SIGSYS there, measured with QEMU 7.2); once it is that user nothing brings root back, as
/// spawning (`spawn=deny`) is the only way left to gain privileges.
pub(crate) fn sandbox_arg(drops_privileges: bool) -> String {
    let elevate = if drops_privileges { "allow" } else { "deny" };
    format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny")
}

/// The uid of `user`, if it is a user of this host (QEMU's `-runas` needs its name in the user
/// database).
pub fn user_uid(user: &str) -> Option<u32> {
    nix::unistd::User::from_name(user)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);

/// Creates TAP device `ifname` (gone again once its last descriptor closes) and runs `attach`
/// with its name to put it on the bridge; returns its descriptor for QEMU to inherit.
pub(crate) async fn open_tap(ifname: &str, attach: &Path) -> Result<OwnedFd> {
    let fd = create_tap(ifname).map_err(|e| {
        VmmError::Invalid(format!(
            "could not create TAP {ifname} on /dev/net/tun: {e} (the agent needs root, or \
             CAP_NET_ADMIN, for bridged networking)"
        ))
    })?;
    let out = tokio::process::Command::new(attach)
        .arg(ifname)
        .output()
        .await
        .map_err(|e| {
            VmmError::Invalid(format!(
                "could not run {} to attach TAP {ifname}: {e}",
                attach.display()
            ))
        })?;
    if !out.status.success() {
        return Err(VmmError::Invalid(format!(
            "{} {ifname} failed ({}): {}",
            attach.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(fd)
}

fn create_tap(ifname: &str) -> std::io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value (an empty name, no flags).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return Err(std::io::Error::other("a TAP name has 1–15 bytes"));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // What QEMU asks for when it opens a TAP itself: frames without packet info, with virtio's
    // header (QEMU probes the descriptor for it).
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: `req` is a valid ifreq that lives across the call; the descriptor is open.
    unsafe { tun_set_iff(file.as_raw_fd(), &req) }.map_err(std::io::Error::from)?;
    Ok(OwnedFd::from(file))
}

/// A descriptor as the number QEMU's `fd=` options take.
pub(crate) fn fd_number(fd: &OwnedFd) -> i32 {
    fd.as_raw_fd()
}
