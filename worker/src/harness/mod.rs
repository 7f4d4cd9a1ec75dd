//! Local processes for the demo, the benchmarks and the system tests: a
//! real `nats-server` on a random loopback port ([`NatsServer`]) and
//! `lockstep worker` processes ([`WorkerProcs`]). Both clean up on drop.

mod nats_server;
mod worker_procs;

pub use nats_server::{find_nats_server, NatsServer, ServerOptions};
pub use worker_procs::WorkerProcs;
