//! End-to-end tests of the `vmatrix` binary, in one place with shared helpers.

mod image;
mod support;
mod up;
