//! Users and groups by name, through the reentrant getpwnam_r/getgrnam_r
//! (nix's `User`/`Group`): the agent resolves names while other threads run.

use nix::unistd::{Group, User};

/// The uid of user `name`; None when there is no such user (or the lookup fails).
pub fn user_id(name: &str) -> Option<u32> {
    User::from_name(name).ok().flatten().map(|u| u.uid.as_raw())
}

/// The gid of group `name`; None when there is no such group (or the lookup fails).
pub fn group_id(name: &str) -> Option<u32> {
    Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_by_name_and_a_made_up_name_is_not() {
        assert_eq!(user_id("root"), Some(0));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(user_id("no-such-user-inbound-audit"), None);
        assert_eq!(group_id("no-such-group-inbound-audit"), None);
        assert_eq!(user_id("nul\0inside"), None);
    }
}
