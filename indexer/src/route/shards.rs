//! The router's view of its shards: each shard's `/v1/index` polled (up or down, its
//! generations and preset), the generation each shard is asked for (pinned so that no answer
//! mixes an old generation of one shard with a new one of another), and the fan-out of one
//! query to every shard with a deadline per shard.

use super::merge::{ShardOutcome, ShardReply};
use super::wire::{ShardAnswer, ShardQuery, WireFeatures};
use crate::serve::api::IndexInfo;
use crate::serve::catalogue::rfc3339;
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

/// What the router last learnt about one shard.
#[derive(Clone, Debug, Default)]
pub struct ShardState {
    /// Its base URL.
    pub url: String,
    /// Whether its last poll answered.
    pub up: bool,
    /// Its last `/v1/index`.
    pub info: Option<IndexInfo>,
    /// Why the last poll failed.
    pub error: Option<String>,
    /// When it was last polled (RFC 3339).
    pub checked_at: Option<String>,
    /// The generation queries ask it for.
    pub pinned: Option<u64>,
}

/// The next pinned generation of every shard, from the pinned ones and what each shard
/// serves now (`serving[i]`: its generations, current first; empty when it is down or has
/// none). All shards switch together once every one of them serves a generation newer than
/// its pinned one; until then each keeps its pinned generation while it still serves it. A
/// shard that no longer serves its pinned generation (restarted after publishing) and a
/// shard never pinned are pinned to their current generation.
pub fn pin(pinned: &[Option<u64>], serving: &[Vec<u64>]) -> Vec<Option<u64>> {
    let current: Vec<Option<u64>> = serving.iter().map(|g| g.first().copied()).collect();
    let all_moved = current
        .iter()
        .zip(pinned)
        .all(|(c, p)| matches!((c, p), (Some(c), Some(p)) if c > p));
    if all_moved {
        return current;
    }
    pinned
        .iter()
        .zip(serving)
        .zip(&current)
        .map(|((p, gens), c)| match p {
            Some(p) if gens.contains(p) => Some(*p),
            Some(p) if gens.is_empty() => Some(*p),
            _ => *c,
        })
        .collect()
}

/// The shards of one router.
pub struct ShardSet {
    client: reqwest::Client,
    token: Option<String>,
    state: RwLock<Vec<ShardState>>,
    /// Woken when a shard the last poll saw down answered a query: the poller looks again
    /// now instead of at its next interval.
    repoll: tokio::sync::Notify,
}

impl ShardSet {
    /// Shards at these base URLs (in shard order), asked with `token` as a bearer when set.
    pub fn new(urls: &[String], token: Option<String>) -> ShardSet {
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        ShardSet {
            client,
            token,
            state: RwLock::new(
                urls.iter()
                    .map(|u| ShardState {
                        url: u.trim_end_matches('/').to_string(),
                        ..ShardState::default()
                    })
                    .collect(),
            ),
            repoll: tokio::sync::Notify::new(),
        }
    }

    /// Waits until a query has reached a shard that the last poll saw down.
    pub async fn repoll_wanted(&self) {
        self.repoll.notified().await
    }

    /// A snapshot of every shard's state.
    pub fn states(&self) -> Vec<ShardState> {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Shards in all.
    pub fn len(&self) -> usize {
        self.states().len()
    }

    /// Whether there are no shards.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let r = self.client.request(method, url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Polls every shard's `/v1/index` once (each within `timeout`) and moves the pins.
    pub async fn poll(&self, timeout: Duration) {
        let urls: Vec<String> = self.states().into_iter().map(|s| s.url).collect();
        let polls = urls.iter().map(|url| async move {
            let r = self
                .request(reqwest::Method::GET, format!("{url}/v1/index"))
                .timeout(timeout)
                .send()
                .await;
            match r {
                Ok(resp) if resp.status().is_success() => resp
                    .json::<IndexInfo>()
                    .await
                    .map_err(|e| format!("unreadable /v1/index: {e}")),
                Ok(resp) => Err(format!("/v1/index answered {}", resp.status())),
                Err(e) => Err(format!("unreachable: {e}")),
            }
        });
        let results = futures::future::join_all(polls).await;
        let now = rfc3339(SystemTime::now());
        let mut state = match self.state.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (s, r) in state.iter_mut().zip(results) {
            s.checked_at = Some(now.clone());
            match r {
                Ok(info) => {
                    if !s.up {
                        tracing::info!(url = %s.url, generation = info.generation, "shard up");
                    }
                    s.up = true;
                    s.error = None;
                    s.info = Some(info);
                }
                Err(e) => {
                    if s.up || s.error.is_none() {
                        tracing::warn!(url = %s.url, error = %e, "shard down");
                    }
                    s.up = false;
                    s.error = Some(e);
                }
            }
        }
        let pinned: Vec<Option<u64>> = state.iter().map(|s| s.pinned).collect();
        let serving: Vec<Vec<u64>> = state
            .iter()
            .map(|s| match (&s.info, s.up) {
                (Some(i), true) if i.generations.is_empty() => vec![i.generation],
                (Some(i), true) => i.generations.clone(),
                _ => Vec::new(),
            })
            .collect();
        for (s, p) in state.iter_mut().zip(pin(&pinned, &serving)) {
            if s.pinned != p {
                tracing::info!(url = %s.url, from = ?s.pinned, to = ?p, "shard generation pinned");
            }
            s.pinned = p;
        }
    }

    /// Sends the query's features to every shard at once and waits for each at most
    /// `deadline`. Every shard is asked, also one the last poll saw down or has not reached
    /// yet (it may have come up since: a shard's query pod can start after the router's last
    /// poll); when such a shard answers, the poller is woken to look at it now.
    pub async fn ask_all(
        &self,
        features: &WireFeatures,
        k: usize,
        verify: bool,
        global: bool,
        deadline: Duration,
    ) -> Vec<ShardReply> {
        let states = self.states();
        let asks = states.iter().enumerate().map(|(i, s)| {
            let query = ShardQuery {
                generation: s.pinned,
                k,
                verify,
                global,
                features: features.clone(),
            };
            async move {
                let t = Instant::now();
                let send = self
                    .request(reqwest::Method::POST, format!("{}/v1/shard/search", s.url))
                    .json(&query)
                    .send();
                let outcome = match tokio::time::timeout(deadline, async {
                    let resp = send.await.map_err(|e| format!("unreachable: {e}"))?;
                    let status = resp.status();
                    if status.is_success() {
                        resp.json::<ShardAnswer>()
                            .await
                            .map_err(|e| format!("unreadable answer: {e}"))
                    } else {
                        let body = resp.text().await.unwrap_or_default();
                        Err(format!("answered {status}: {}", body.trim()))
                    }
                })
                .await
                {
                    Err(_) => ShardOutcome::Late,
                    Ok(Ok(a)) => ShardOutcome::Answered(a),
                    Ok(Err(e)) => ShardOutcome::Failed(e),
                };
                ShardReply {
                    shard: i as u32,
                    outcome,
                    ms: t.elapsed().as_secs_f64() * 1000.0,
                }
            }
        });
        let replies = futures::future::join_all(asks).await;
        let came_up = replies.iter().any(|r| {
            matches!(r.outcome, ShardOutcome::Answered(_))
                && states.get(r.shard as usize).is_some_and(|s| !s.up)
        });
        if came_up {
            self.repoll.notify_one();
        }
        replies
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpinned_shards_pin_to_what_they_serve() {
        assert_eq!(
            pin(&[None, None, None], &[vec![1], vec![], vec![3]]),
            [Some(1), None, Some(3)]
        );
    }

    #[test]
    fn shards_switch_together_once_every_one_has_published() {
        let pinned = [Some(1), Some(1), Some(1)];
        // Shard 0 published generation 2 and keeps 1: everyone stays on 1.
        let partly = pin(&pinned, &[vec![2, 1], vec![1], vec![1]]);
        assert_eq!(partly, pinned);
        // Every shard has published: all switch at once.
        assert_eq!(
            pin(&pinned, &[vec![2, 1], vec![2, 1], vec![2, 1]]),
            [Some(2), Some(2), Some(2)]
        );
    }

    #[test]
    fn a_down_shard_keeps_its_pin_and_a_restarted_one_is_repinned() {
        let pinned = [Some(1), Some(1)];
        // Shard 1 is down: it keeps its pin (and nobody switches).
        assert_eq!(pin(&pinned, &[vec![2, 1], vec![]]), pinned);
        // Shard 1 came back after publishing 2 and serves only 2: it cannot answer for 1.
        assert_eq!(pin(&pinned, &[vec![1], vec![2]]), [Some(1), Some(2)]);
    }
}
