//! The pages, one concern a file (see the crate map).

pub(crate) mod audit;
pub(crate) mod events;
pub(crate) mod failed;
pub(crate) mod job;
pub(crate) mod listeners;
pub(crate) mod overview;
pub(crate) mod params;
