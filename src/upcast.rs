//! Upcasting: old payload shapes turned into the current one wherever
//! events are read.
//!
//! An event's payload carries its `schema_version` (from
//! [`DomainEvent::schema_version`](crate::DomainEvent::schema_version),
//! 1 unless the event says otherwise), and stored or queued events keep the
//! version they were recorded with. When a payload's shape changes, the
//! service bumps the version and registers an upcaster from the old version
//! to the next ([`Registry::upcaster`](crate::Registry::upcaster)); a
//! chain v1 -> v2 -> v3 applies its steps in order. Every reader applies
//! them: the worker right after decoding a message (so listeners, replays
//! through `outbox replay` and the webhook fan-out see the current shape),
//! and projection rebuilds as they read the event log.
//!
//! A type with upcasters has a current version, one past its last step.
//! An event newer than that (written by a newer service than the reader) or
//! one whose chain has a missing step is a permanent failure with a clear
//! reason, never a panic; a type without upcasters is passed through as it
//! is, whatever its version.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::envelope::is_valid_event_type;
use crate::error::{Error, ListenerError, Result};

/// One step: the payload of version `from` into version `from + 1`.
type Step = Arc<dyn Fn(Value) -> std::result::Result<Value, String> + Send + Sync>;

/// The upcasters of a registry, by event type.
#[derive(Clone, Default)]
pub struct Upcasters {
    chains: HashMap<String, BTreeMap<i32, Step>>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        let mut types: Vec<&String> = self.chains.keys().collect();
        types.sort();
        for event_type in types {
            let steps: Vec<String> = self.chains[event_type]
                .keys()
                .map(|from| format!("v{from}->v{}", from + 1))
                .collect();
            map.entry(event_type, &steps);
        }
        map.finish()
    }
}

/// Why a payload could not be brought to the current version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpcastError {
    /// Written by a newer service than this reader.
    #[error(
        "{event_type} schema version {version} is newer than this reader knows (version {current}): deploy the newer listener"
    )]
    TooNew {
        /// The event type.
        event_type: String,
        /// The payload's version.
        version: i32,
        /// The newest this reader knows.
        current: i32,
    },
    /// A step of the chain is not registered.
    #[error("{event_type} has no upcaster from schema version {from} to {}", from + 1)]
    MissingStep {
        /// The event type.
        event_type: String,
        /// The version without a step.
        from: i32,
    },
    /// A step refused the payload.
    #[error("upcasting {event_type} from schema version {from} failed: {reason}")]
    StepFailed {
        /// The event type.
        event_type: String,
        /// The version the step starts from.
        from: i32,
        /// The step's reason.
        reason: String,
    },
}

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the step from `from_version` to `from_version + 1` of
    /// `event_type`. Fails on a bad type, a version below 1 or a step
    /// already registered.
    pub fn add(
        &mut self,
        event_type: &str,
        from_version: i32,
        step: impl Fn(Value) -> std::result::Result<Value, String> + Send + Sync + 'static,
    ) -> Result<()> {
        if !is_valid_event_type(event_type) {
            return Err(Error::Config(format!(
                "upcaster for {event_type:?}, which is not a dotted lower-case event type"
            )));
        }
        if from_version < 1 || from_version == i32::MAX {
            return Err(Error::Config(format!(
                "upcaster of {event_type} from schema version {from_version}: versions start at 1"
            )));
        }
        let chain = self.chains.entry(event_type.to_owned()).or_default();
        if chain.contains_key(&from_version) {
            return Err(Error::Config(format!(
                "{event_type} already has an upcaster from schema version {from_version}"
            )));
        }
        chain.insert(from_version, Arc::new(step));
        Ok(())
    }

    /// Every step as `(event type, from version)`, sorted.
    pub fn steps(&self) -> Vec<(String, i32)> {
        let mut steps: Vec<(String, i32)> = self
            .chains
            .iter()
            .flat_map(|(event_type, chain)| chain.keys().map(move |from| (event_type.clone(), *from)))
            .collect();
        steps.sort();
        steps
    }

    /// Whether none are registered.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// The current version of `event_type` (one past its last step), or
    /// `None` when it has no upcasters.
    pub fn current_version(&self, event_type: &str) -> Option<i32> {
        self.chains
            .get(event_type)
            .and_then(|chain| chain.keys().next_back())
            .map(|last| last + 1)
    }

    /// `payload` of `event_type` at `version`, brought to the current
    /// version; returns the version it is at (unchanged for a type without
    /// upcasters).
    pub fn upcast_value(
        &self,
        event_type: &str,
        version: i32,
        payload: Value,
    ) -> std::result::Result<(i32, Value), UpcastError> {
        let Some(chain) = self.chains.get(event_type) else {
            return Ok((version, payload));
        };
        let current = chain.keys().next_back().map_or(version, |last| last + 1);
        if version > current {
            return Err(UpcastError::TooNew {
                event_type: event_type.to_owned(),
                version,
                current,
            });
        }
        let (mut at, mut payload) = (version, payload);
        while at < current {
            let step = chain.get(&at).ok_or_else(|| UpcastError::MissingStep {
                event_type: event_type.to_owned(),
                from: at,
            })?;
            payload = step(payload).map_err(|reason| UpcastError::StepFailed {
                event_type: event_type.to_owned(),
                from: at,
                reason,
            })?;
            at += 1;
        }
        Ok((at, payload))
    }

    /// Brings a received event's payload to the current version in place
    /// (nothing to do, and no parsing, when its type has no upcasters or it
    /// is current). A failure is permanent: redelivering cannot help.
    pub fn upcast(&self, event: &mut crate::ReceivedEvent) -> std::result::Result<(), ListenerError> {
        match self.current_version(&event.event_type) {
            None => return Ok(()),
            Some(current) if current == event.schema_version => return Ok(()),
            Some(_) => {}
        }
        let payload: Value = serde_json::from_str(event.data.get()).map_err(ListenerError::permanent)?;
        let (version, payload) = self
            .upcast_value(&event.event_type, event.schema_version, payload)
            .map_err(ListenerError::permanent)?;
        event.data = serde_json::value::to_raw_value(&payload).map_err(ListenerError::permanent)?;
        event.schema_version = version;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn chain() -> Result<Upcasters> {
        let mut upcasters = Upcasters::new();
        // v1 {name} -> v2 {first, last} -> v3 {first, last, email: null}
        upcasters.add("user.registered", 2, |mut v| {
            v["email"] = Value::Null;
            Ok(v)
        })?;
        upcasters.add("user.registered", 1, |v| {
            let name = v["name"].as_str().ok_or("no name")?.to_owned();
            let (first, last) = name.split_once(' ').unwrap_or((&name, ""));
            Ok(json!({"first": first, "last": last}))
        })?;
        Ok(upcasters)
    }

    #[test]
    fn a_chain_applies_in_order_from_any_older_version() -> TestResult {
        let upcasters = chain()?;
        assert_eq!(upcasters.current_version("user.registered"), Some(3));
        let (version, payload) =
            upcasters.upcast_value("user.registered", 1, json!({"name": "Ada Lovelace"}))?;
        assert_eq!(version, 3);
        assert_eq!(
            payload,
            json!({"first": "Ada", "last": "Lovelace", "email": null})
        );
        let from_v2 = upcasters.upcast_value("user.registered", 2, json!({"first": "A", "last": "B"}))?;
        assert_eq!(from_v2, (3, json!({"first": "A", "last": "B", "email": null})));
        let current = json!({"first": "A", "last": "B", "email": "a@b.c"});
        assert_eq!(
            upcasters.upcast_value("user.registered", 3, current.clone())?,
            (3, current)
        );
        Ok(())
    }

    #[test]
    fn newer_versions_missing_steps_and_refusals_are_clear_errors() -> TestResult {
        let upcasters = chain()?;
        let too_new = upcasters.upcast_value("user.registered", 4, json!({})).err();
        assert!(matches!(
            too_new,
            Some(UpcastError::TooNew {
                version: 4,
                current: 3,
                ..
            })
        ));
        assert!(too_new.is_some_and(|e| e.to_string().contains("newer than this reader knows")));
        let refused = upcasters
            .upcast_value("user.registered", 1, json!({"nom": 1}))
            .err();
        assert!(refused.is_some_and(|e| e.to_string().contains("from schema version 1 failed: no name")));
        let mut gappy = Upcasters::new();
        gappy.add("site.created", 2, Ok)?;
        let missing = gappy
            .upcast_value("site.created", 1, json!({}))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            missing.as_deref(),
            Some("site.created has no upcaster from schema version 1 to 2")
        );
        Ok(())
    }

    #[test]
    fn types_without_upcasters_pass_and_bad_registrations_are_refused() -> TestResult {
        let upcasters = chain()?;
        assert_eq!(
            upcasters.upcast_value("site.created", 7, json!({"a": 1}))?,
            (7, json!({"a": 1}))
        );
        let mut again = chain()?;
        assert!(again.add("user.registered", 1, Ok).is_err());
        assert!(again.add("Bad Type", 1, Ok).is_err());
        assert!(again.add("user.registered", 0, Ok).is_err());
        Ok(())
    }
}
