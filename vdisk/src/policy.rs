//! Request policies of an image from QEMU's generic block options that are not
//! transformations of the data (those are write hooks, [`crate::hook`]).
//!
//! `discard` (QEMU's BDRV_O_UNMAP): with `ignore` (or `off`) the image never
//! deallocates on request: discards succeed and change nothing, and zero writes keep
//! their range allocated. `unmap` (or `on`) passes them on. [`crate::Image`] applies it
//! with one test per request, so the hook-free data path stays hook-free.

use crate::error::{Invalid, Result};

/// The `discard` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiscardMode {
    /// Discards are done and zero writes may deallocate.
    #[default]
    Unmap,
    /// Discards do nothing; zero writes never deallocate.
    Ignore,
}

impl DiscardMode {
    /// Parses QEMU's value (`ignore`/`off`, `unmap`/`on`).
    pub fn parse(s: &str) -> Result<DiscardMode> {
        match s {
            "ignore" | "off" => Ok(DiscardMode::Ignore),
            "unmap" | "on" => Ok(DiscardMode::Unmap),
            _ => Err(Invalid::BadDiscardOption.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_words() {
        assert_eq!(DiscardMode::parse("off").unwrap(), DiscardMode::Ignore);
        assert_eq!(DiscardMode::parse("ignore").unwrap(), DiscardMode::Ignore);
        assert_eq!(DiscardMode::parse("on").unwrap(), DiscardMode::Unmap);
        assert_eq!(DiscardMode::parse("unmap").unwrap(), DiscardMode::Unmap);
        assert_eq!(
            DiscardMode::parse("x").unwrap_err().to_string(),
            "Invalid discard option"
        );
    }
}
