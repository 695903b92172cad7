//! # fbr-throttling: how much may leave the relay, and in which order
//!
//! Sans-IO: no clock, no sockets, no tokio. Time comes in as a `now: Instant` argument
//! (or a weekday and minute for the schedule), so tests drive everything with virtual
//! time; the relay's shell (`relay/src/egress.rs`) owns the real clock and the waiting.
//!
//! - [`TokenBucket`]: an egress rate in bytes per second with a burst.
//! - [`WeeklySchedule`]: the rate in force at a given weekday and minute (e.g. 100 Mbit/s
//!   09:00-18:00 Monday to Friday, unlimited otherwise), parsed from a one-line spec.
//! - [`FairQueue`]: weighted deficit round robin among streams, so a high-churn VM
//!   cannot starve the others.
//!
//! Invariants: over any interval of length `t`, a bucket grants at most
//! `burst + rate × t` bytes; a fair queue serves every flow with pending demand within
//! one round, in proportion to its weight over many rounds.
#![forbid(unsafe_code)]

mod bucket;
mod fair;
mod schedule;

pub use bucket::{Rate, TokenBucket};
pub use fair::FairQueue;
pub use schedule::{weekday_and_minute, DayWindow, ScheduleError, WeeklySchedule};
