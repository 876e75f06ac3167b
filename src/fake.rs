//! [`EventFake`]: assert which events code recorded, without a broker or an
//! outbox table (the seed's `Event::fake()` style).

use std::sync::{Arc, Mutex, PoisonError};

use serde::de::DeserializeOwned;

use crate::envelope::EventEnvelope;

/// The events an [`Outbox::fake`](crate::Outbox::fake) outbox received, with
/// assertions that panic with a readable message (they are for tests).
#[derive(Debug, Clone, Default)]
pub struct EventFake {
    events: Arc<Mutex<Vec<EventEnvelope>>>,
}

impl EventFake {
    pub(crate) fn push(&self, envelopes: Vec<EventEnvelope>) {
        self.lock().extend(envelopes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<EventEnvelope>> {
        // A panicking test thread must not hide the events from the others.
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every recorded event, oldest first.
    pub fn recorded(&self) -> Vec<EventEnvelope> {
        self.lock().clone()
    }

    /// The recorded events of `event_type`, oldest first.
    pub fn recorded_of(&self, event_type: &str) -> Vec<EventEnvelope> {
        self.lock()
            .iter()
            .filter(|e| e.event_type == event_type)
            .cloned()
            .collect()
    }

    /// The payloads of the recorded events of `event_type`, deserialized.
    ///
    /// # Panics
    /// If a payload does not deserialize into `T`.
    pub fn payloads<T: DeserializeOwned>(&self, event_type: &str) -> Vec<T> {
        self.recorded_of(event_type)
            .iter()
            .map(|e| match e.payload_as::<T>() {
                Ok(value) => value,
                Err(error) => panic!(
                    "payload of {event_type} event {} does not deserialize: {error}",
                    e.event_id
                ),
            })
            .collect()
    }

    /// Recorded event types in order, for a one-line comparison.
    pub fn event_types(&self) -> Vec<String> {
        self.lock().iter().map(|e| e.event_type.clone()).collect()
    }

    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Asserts at least one `event_type` event was recorded.
    ///
    /// # Panics
    /// If none was.
    #[track_caller]
    pub fn assert_recorded(&self, event_type: &str) {
        assert!(
            !self.recorded_of(event_type).is_empty(),
            "expected a {event_type} event; recorded: {:?}",
            self.event_types()
        );
    }

    /// Asserts exactly `times` `event_type` events were recorded.
    ///
    /// # Panics
    /// If the count differs.
    #[track_caller]
    pub fn assert_recorded_times(&self, event_type: &str, times: usize) {
        let count = self.recorded_of(event_type).len();
        assert!(
            count == times,
            "expected {times} {event_type} event(s), found {count}; recorded: {:?}",
            self.event_types()
        );
    }

    /// Asserts no `event_type` event was recorded.
    ///
    /// # Panics
    /// If one was.
    #[track_caller]
    pub fn assert_not_recorded(&self, event_type: &str) {
        self.assert_recorded_times(event_type, 0);
    }

    /// Asserts nothing at all was recorded.
    ///
    /// # Panics
    /// If anything was.
    #[track_caller]
    pub fn assert_nothing_recorded(&self) {
        let types = self.event_types();
        assert!(types.is_empty(), "expected no events; recorded: {types:?}");
    }
}
