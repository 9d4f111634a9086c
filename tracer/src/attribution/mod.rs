//! Who is involved in a drop: the listener, its owner, the refused client.
pub mod address;
pub mod listeners;
pub mod owners;
pub mod process;
pub mod rlimits;
pub mod sock_diag;
pub mod tcp;
