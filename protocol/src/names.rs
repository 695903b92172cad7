//! Names that travel on the wire and end up in file paths and certificates.
//!
//! VM names and replication-group names become directory names at the master target and
//! URI SANs in certificates, so they are restricted to a safe alphabet: 1 to 64 bytes of
//! ASCII letters, digits, `-`, `_` and `.`, not starting with `.`. This rules out path
//! traversal (`..`, `/`) by construction.

/// Longest VM or group name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a VM or replication-group name; returns the reason when it is refused.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name is {} bytes long, the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name.starts_with('.') {
        return Err(format!("name {name:?} starts with '.'"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "name {name:?} contains {bad:?}; allowed are ASCII letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["vm1", "sql-server_01", "web.prod", "a"] {
            assert!(validate_name(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn refuses_paths_and_oddities() {
        for n in [
            "",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "vm 1",
            "é",
            &"x".repeat(65),
        ] {
            assert!(validate_name(n).is_err(), "{n:?}");
        }
    }
}
