//! Users and groups by name.

pub fn user_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    // SAFETY: non-null result of getpwnam.
    (!entry.is_null()).then(|| unsafe { (*entry).pw_uid })
}

pub fn group_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam returns NULL or a pointer to static storage, read at once.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    // SAFETY: non-null result of getgrnam.
    (!entry.is_null()).then(|| unsafe { (*entry).gr_gid })
}
