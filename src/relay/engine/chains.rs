//! Each aggregate's chain of held rows: claimed rows join their chain,
//! only a chain's head is published, a confirm settles it and publishes the
//! next; failures and lost leases cut the chain so nothing later overtakes.

use super::*;

impl Session<'_> {
    /// Appends claimed rows to their aggregates' chains and publishes new
    /// heads.
    pub(super) async fn accept_claimed(
        &mut self,
        generation: u64,
        claim_started: Instant,
        rows: Vec<ClaimedEvent>,
    ) -> std::result::Result<(), SessionLost> {
        let lease_deadline = claim_started + self.shared.config.lease;
        if let Some(first) = rows.first() {
            // One lease per claim; renewals move it later.
            self.lease_deadlines
                .entry(first.lease_id)
                .or_insert(lease_deadline);
        }
        let mut new_heads = Vec::new();
        for row in rows {
            let key = (row.aggregate_type.clone(), row.aggregate_id.clone());
            if self.stopping || self.blocked.get(&key).is_some_and(|g| *g >= generation) {
                self.pending.releases.push((row.seq, row.lease_id));
                *self.lease_rows.entry(row.lease_id).or_insert(0) += 1;
                continue;
            }
            self.held += 1;
            *self.lease_rows.entry(row.lease_id).or_insert(0) += 1;
            let chain = self.chains.entry(key.clone()).or_insert_with(|| Chain {
                rows: VecDeque::new(),
                head_in_flight: false,
            });
            if chain.rows.is_empty() {
                new_heads.push(key);
            }
            chain.rows.push_back(HeldRow { row });
        }
        for key in new_heads {
            self.publish_head(key).await?;
        }
        metrics::gauge!(m::IN_FLIGHT).set(self.held as f64);
        Ok(())
    }

    /// Publishes the head of `key`'s chain, unless its lease may end before
    /// the next renewal could extend it (then the chain is given back: its
    /// relay froze or lost the database long enough that another relay may
    /// take the rows over).
    pub(super) async fn publish_head(&mut self, key: AggregateKey) -> std::result::Result<(), SessionLost> {
        let confirm_timeout = self.shared.config.confirm_timeout;
        let margin = self.shared.config.heartbeat_interval();
        let (seq, event_id, lease_ok) = match self.chains.get(&key) {
            Some(chain) if !chain.head_in_flight => match chain.rows.front() {
                Some(head) => (
                    head.row.seq,
                    head.row.event_id,
                    self.lease_deadlines
                        .get(&head.row.lease_id)
                        .is_some_and(|deadline| Instant::now() + margin < *deadline),
                ),
                None => {
                    self.chains.remove(&key);
                    return Ok(());
                }
            },
            _ => return Ok(()),
        };
        if self.stopping || !lease_ok {
            self.cut_chain(&key, 0);
            return Ok(());
        }
        let sent = match self.chains.get(&key).and_then(|c| c.rows.front()) {
            Some(head) => self.publisher.publish(&head.row).await,
            None => return Ok(()),
        };
        match sent {
            Ok(confirm) => {
                crash_point!("relay::after_publish");
                if let Some(chain) = self.chains.get_mut(&key) {
                    chain.head_in_flight = true;
                }
                self.in_flight.push_back(Box::pin(async move {
                    let outcome = tokio::time::timeout(confirm_timeout, confirm).await;
                    Confirmed {
                        key,
                        seq,
                        event_id,
                        outcome,
                    }
                }));
                Ok(())
            }
            Err(PublishError::Encode(reason)) => {
                metrics::counter!(m::PUBLISH_FAILURES_TOTAL, "reason" => "encode").increment(1);
                tracing::error!(seq, %reason, "cannot encode event");
                self.fail_head(&key, format!("cannot encode: {reason}"));
                Ok(())
            }
            Err(PublishError::Broker(error)) => Err(SessionLost::Publish(error)),
        }
    }

    pub(super) async fn on_confirm(&mut self, confirmed: Confirmed) -> std::result::Result<(), SessionLost> {
        let Confirmed {
            key,
            seq,
            event_id,
            outcome,
        } = confirmed;
        crash_point!("relay::after_confirm");
        let mut unroutable = false;
        let failure = match outcome {
            Ok(Ok(confirmation)) => {
                let acked = confirmation.is_ack();
                if let Some(message) = confirmation.take_message() {
                    // Our message ids are event ids; anything else is not ours.
                    let id = message
                        .delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .and_then(|id| uuid::Uuid::parse_str(id.as_str()).ok());
                    tracing::debug!(message_id = ?id, reply = %message.reply_text, "broker returned a message");
                    if let Some(id) = id {
                        self.returned.insert(id);
                    }
                }
                // Checked on every confirm: a set lookup, no allocation.
                let returned = self.returned.remove(&event_id);
                if returned && !self.shared.config.strict_routing && acked {
                    // Routed to no queue: published to nobody. Kept and
                    // flagged rather than retried, so its aggregate goes on.
                    unroutable = true;
                    None
                } else if returned {
                    let event_type = self
                        .chains
                        .get(&key)
                        .and_then(|c| c.rows.front())
                        .map(|h| h.row.event_type.clone())
                        .unwrap_or_default();
                    Some((
                        "unroutable",
                        format!(
                            "returned by the broker: NO_ROUTE (no queue is bound for routing key {event_type})"
                        ),
                    ))
                } else if acked {
                    None
                } else {
                    Some(("nack", "negatively acknowledged by the broker".to_owned()))
                }
            }
            Ok(Err(error)) => {
                metrics::counter!(m::PUBLISH_FAILURES_TOTAL, "reason" => "connection").increment(1);
                return Err(SessionLost::Confirm(error));
            }
            Err(_) => Some((
                "timeout",
                format!("no confirm within {:?}", self.shared.config.confirm_timeout),
            )),
        };
        if self
            .chains
            .get(&key)
            .and_then(|c| c.rows.front())
            .map(|h| h.row.seq)
            != Some(seq)
        {
            // The chain was given back meanwhile (shutdown); nothing to do.
            return Ok(());
        }
        match failure {
            None => {
                let mut chain_done = false;
                if let Some(chain) = self.chains.get_mut(&key) {
                    chain.head_in_flight = false;
                    if let Some(done) = chain.rows.pop_front() {
                        self.held -= 1;
                        let latency = (chrono::Utc::now() - done.row.recorded_at)
                            .num_microseconds()
                            .unwrap_or(0);
                        metrics::histogram!(m::PUBLISH_LATENCY_SECONDS).record(latency.max(0) as f64 / 1e6);
                        if unroutable {
                            metrics::counter!(m::UNROUTABLE_TOTAL, "event_type" => done.row.event_type.clone())
                                .increment(1);
                            tracing::warn!(seq, event_id = %done.row.event_id, event_type = %done.row.event_type,
                                "no queue is bound to this event type: kept as unroutable (replay it once a listener exists)");
                            self.pending.to_mark_unroutable.push((seq, done.row.lease_id));
                        } else {
                            tracing::debug!(seq, event_id = %done.row.event_id, event_type = %done.row.event_type, "published");
                            self.pending.to_mark.push((seq, done.row.lease_id));
                        }
                    }
                    chain_done = chain.rows.is_empty();
                }
                if chain_done {
                    self.chains.remove(&key);
                } else {
                    self.publish_head(key).await?;
                }
            }
            Some((reason, error)) => {
                metrics::counter!(m::PUBLISH_FAILURES_TOTAL, "reason" => reason).increment(1);
                tracing::warn!(seq, %error, "publish failed");
                self.fail_head(&key, error);
            }
        }
        metrics::gauge!(m::IN_FLIGHT).set(self.held as f64);
        Ok(())
    }

    /// Records a failed attempt for the chain's head and gives back the
    /// rest of the chain: the aggregate waits for the head's retry.
    pub(super) fn fail_head(&mut self, key: &AggregateKey, error: String) {
        if let Some(chain) = self.chains.get_mut(key)
            && let Some(head) = chain.rows.pop_front()
        {
            self.held -= 1;
            let attempts = u32::try_from(head.row.attempts).unwrap_or(0);
            self.pending.failures.push(PublishFailure {
                seq: head.row.seq,
                lease_id: head.row.lease_id,
                error,
                retry_in: self.shared.config.backoff_after(attempts),
            });
        }
        self.cut_chain(key, 0);
    }

    /// Gives back the leases of `key`'s rows from index `from` on and
    /// forgets them; guards against a running claim re-adding them.
    pub(super) fn cut_chain(&mut self, key: &AggregateKey, from: usize) {
        if let Some(chain) = self.chains.get_mut(key) {
            let cut: Vec<HeldRow> = chain.rows.drain(from..).collect();
            self.held -= cut.len();
            self.pending
                .releases
                .extend(cut.iter().map(|h| (h.row.seq, h.row.lease_id)));
            if chain.rows.is_empty() {
                self.chains.remove(key);
            }
        }
        self.blocked.insert(key.clone(), self.generation);
    }

    /// At shutdown: keep only the in-flight heads, give back the rest.
    pub(super) fn cut_waiting_rows(&mut self) {
        let keys: Vec<(AggregateKey, bool)> = self
            .chains
            .iter()
            .map(|(k, c)| (k.clone(), c.head_in_flight))
            .collect();
        for (key, head_in_flight) in keys {
            self.cut_chain(&key, usize::from(head_in_flight));
        }
    }
}
