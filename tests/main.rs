//! Integration tests: the real `orchestrator` binary, the real bundled
//! plugins (and the guest programs in `tests/plugins/`), real HTTP on
//! loopback. One test binary, as in wasmtime.

mod common;

mod admission;
mod api;
mod authoring;
mod composition;
mod connections;
mod docs;
mod faithful;
mod finish;
mod hotswap;
mod layout;
mod metrics;
mod ops;
mod policies;
mod sandbox;
mod sdk;
mod startup;
mod stores;
mod traces;
mod upstream;
