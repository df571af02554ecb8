//! End-to-end tests of the `vmatrix` binary, in one place with shared helpers.

mod bench;
mod cluster;
mod dashboard;
mod debian;
mod demo;
mod durable;
mod faults;
mod formats;
mod ha;
mod health;
mod image;
mod isolation;
mod lifecycle;
mod netns;
mod network;
mod policy;
mod protocols;
mod sim;
mod sim_real;
mod standby;
mod support;
mod switch;
mod units;
mod up;
mod volumes;
