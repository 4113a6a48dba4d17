//! Integration tests: one binary, a module per flow. Everything runs on real loopback sockets
//! against in-process origins (`support::origin`) and, from the cache on, a real `redis-server`
//! (`support::redis`).

mod support;

mod access_log;
mod admin;
mod balance;
mod browser;
mod cache;
mod cli;
mod cms;
mod coalesce;
mod corrupt;
mod debug;
mod deploy;
mod fidelity;
mod fleet_view;
mod harness;
mod invalidate;
mod lane;
mod lifecycle;
mod limits;
mod memory;
mod pool;
mod refresh;
mod reload;
mod retention;
mod routes;
mod sanitize;
mod store;
mod tail;
mod warm;
