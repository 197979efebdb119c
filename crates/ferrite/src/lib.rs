//! Client-side helpers shared by the `ferrite` binary, its tests and benchmarks.

pub mod murmur2;
