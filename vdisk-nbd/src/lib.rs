//! NBD server front-end (pending).
