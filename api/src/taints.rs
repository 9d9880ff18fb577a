//! Taints on nodes and tolerations on sandboxes (as in Kubernetes): which sandboxes a node takes,
//! and when a NoExecute taint evicts one that runs there.

use serde::{Deserialize, Serialize};

/// What a taint does to sandboxes that do not tolerate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TaintEffect {
    /// Nothing new is placed on the node; running sandboxes stay.
    NoSchedule,
    /// Nothing new is placed, and running sandboxes are evicted (after their `toleration_seconds`).
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// A taint on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    pub effect: TaintEffect,
    /// When the taint appeared on the node (set by the server; `toleration_seconds` counts from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_at: Option<String>,
}

impl Taint {
    /// Same key, value and effect (the time it was added aside).
    pub fn same_as(&self, other: &Taint) -> bool {
        (&self.key, &self.value, self.effect) == (&other.key, &other.value, other.effect)
    }
}

impl std::fmt::Display for Taint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.value.is_empty() {
            true => write!(f, "{}:{}", self.key, self.effect.as_str()),
            false => write!(f, "{}={}:{}", self.key, self.value, self.effect.as_str()),
        }
    }
}

/// How a toleration compares a taint's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TolerationOperator {
    /// The key and the value match.
    #[default]
    Equal,
    /// The key matches, whatever the value; an empty key with `Exists` tolerates every taint.
    Exists,
}

/// A sandbox's toleration of taints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    #[serde(default)]
    pub operator: TolerationOperator,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// The effect tolerated; absent: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
    /// For NoExecute: how long the sandbox stays after the taint appears; absent: for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

impl Toleration {
    /// Whether this toleration matches `taint` (Kubernetes' rule).
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if self.effect.is_some_and(|e| e != taint.effect) {
            return false;
        }
        match self.operator {
            TolerationOperator::Exists => self.key.is_empty() || self.key == taint.key,
            TolerationOperator::Equal => self.key == taint.key && self.value == taint.value,
        }
    }
}

/// The first taint of `taints` that keeps a sandbox with `tolerations` off the node, if any.
pub fn untolerated<'a>(taints: &'a [Taint], tolerations: &[Toleration]) -> Option<&'a Taint> {
    taints.iter().find(|taint| !tolerations.iter().any(|t| t.tolerates(taint)))
}

/// What the NoExecute taints of a node mean for a sandbox running there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction<'a> {
    Never,
    /// Now, because of this taint (not tolerated, or tolerated for a time that has passed).
    Now(&'a Taint),
    /// At this Unix time, when the shortest `toleration_seconds` of a matching taint runs out.
    At(i64, &'a Taint),
}

/// When the NoExecute taints evict a sandbox with `tolerations`, at Unix time `now`. A taint without
/// a parseable `added_at` counts from `now`.
pub fn eviction<'a>(taints: &'a [Taint], tolerations: &[Toleration], now: i64) -> Eviction<'a> {
    let mut earliest: Option<(i64, &Taint)> = None;
    for taint in taints.iter().filter(|t| t.effect == TaintEffect::NoExecute) {
        let matching: Vec<&Toleration> = tolerations.iter().filter(|t| t.tolerates(taint)).collect();
        if matching.is_empty() {
            return Eviction::Now(taint);
        }
        // Any toleration without a limit keeps the sandbox for ever; else the longest limit counts.
        if matching.iter().any(|t| t.toleration_seconds.is_none()) {
            continue;
        }
        let seconds = matching.iter().filter_map(|t| t.toleration_seconds).max().unwrap_or(0).max(0);
        let since = taint.added_at.as_deref().and_then(crate::time::parse_rfc3339).unwrap_or(now);
        let at = since.saturating_add(seconds);
        if earliest.is_none_or(|(e, _)| at < e) {
            earliest = Some((at, taint));
        }
    }
    match earliest {
        Some((at, taint)) if at <= now => Eviction::Now(taint),
        Some((at, taint)) => Eviction::At(at, taint),
        None => Eviction::Never,
    }
}

/// The taint the system puts on a NotReady node (Kubernetes' `node.kubernetes.io/not-ready`):
/// NoExecute, stamped with the time the node became NotReady.
pub const NOT_READY_TAINT: &str = "sandboxd.io/not-ready";

/// Whether `key` belongs to a taint only the system sets (a user's post of it is ignored).
pub fn is_system_taint(key: &str) -> bool {
    key == NOT_READY_TAINT
}

/// `taints` with the system's taints brought in line with the node's state: the not-ready taint is
/// there exactly while the node is NotReady, added at `not_ready_since` (kept when already there).
pub fn with_system_taints(taints: &[Taint], not_ready_since: Option<&str>) -> Vec<Taint> {
    let current = taints.iter().find(|t| t.key == NOT_READY_TAINT).cloned();
    let mut synced: Vec<Taint> = taints.iter().filter(|t| !is_system_taint(&t.key)).cloned().collect();
    if let Some(since) = not_ready_since {
        synced.push(current.unwrap_or_else(|| Taint {
            key: NOT_READY_TAINT.to_string(),
            value: String::new(),
            effect: TaintEffect::NoExecute,
            added_at: Some(since.to_string()),
        }));
    }
    synced
}

/// A sandbox's tolerations with the default one added (Kubernetes' DefaultTolerationSeconds): a
/// sandbox that does not say how long it tolerates a NotReady node stays `grace_seconds` on it.
pub fn with_default_tolerations(tolerations: &[Toleration], grace_seconds: i64) -> std::borrow::Cow<'_, [Toleration]> {
    let probe =
        Taint { key: NOT_READY_TAINT.into(), value: String::new(), effect: TaintEffect::NoExecute, added_at: None };
    if tolerations.iter().any(|t| t.tolerates(&probe)) {
        return std::borrow::Cow::Borrowed(tolerations);
    }
    let mut all = tolerations.to_vec();
    all.push(Toleration {
        key: NOT_READY_TAINT.into(),
        operator: TolerationOperator::Exists,
        value: String::new(),
        effect: Some(TaintEffect::NoExecute),
        toleration_seconds: Some(grace_seconds),
    });
    std::borrow::Cow::Owned(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, value: &str, effect: TaintEffect) -> Taint {
        Taint { key: key.into(), value: value.into(), effect, added_at: Some("2026-12-01T00:00:00Z".into()) }
    }

    fn toleration(key: &str, operator: TolerationOperator, value: &str, effect: Option<TaintEffect>) -> Toleration {
        Toleration { key: key.into(), operator, value: value.into(), effect, toleration_seconds: None }
    }

    #[test]
    fn tolerations_match_as_kubernetes_matches_them() {
        use TaintEffect::*;
        use TolerationOperator::*;
        let gpu = taint("gpu", "a100", NoSchedule);
        let cases = [
            ("equal key and value", toleration("gpu", Equal, "a100", None), true),
            ("equal, other value", toleration("gpu", Equal, "h100", None), false),
            ("exists, any value", toleration("gpu", Exists, "", None), true),
            ("exists, other key", toleration("zone", Exists, "", None), false),
            ("empty key exists: everything", toleration("", Exists, "", None), true),
            ("the same effect", toleration("gpu", Exists, "", Some(NoSchedule)), true),
            ("another effect", toleration("gpu", Exists, "", Some(NoExecute)), false),
        ];
        for (what, t, want) in cases {
            assert_eq!(t.tolerates(&gpu), want, "{what}");
        }
        assert_eq!(untolerated(std::slice::from_ref(&gpu), &[]), Some(&gpu));
        assert_eq!(untolerated(std::slice::from_ref(&gpu), &[toleration("gpu", Exists, "", None)]), None);
    }

    #[test]
    fn no_execute_evicts_at_once_after_the_toleration_or_never() {
        use TaintEffect::*;
        let added = crate::time::parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
        let maintenance = taint("maintenance", "", NoExecute);
        let taints = [taint("gpu", "", NoSchedule), maintenance.clone()];
        let for_secs = |s| Toleration {
            toleration_seconds: Some(s),
            ..toleration("maintenance", TolerationOperator::Exists, "", None)
        };
        let forever = toleration("maintenance", TolerationOperator::Exists, "", None);
        assert_eq!(eviction(&taints, &[], added), Eviction::Now(&taints[1]), "NoSchedule alone evicts nothing");
        assert_eq!(eviction(&taints, &[for_secs(60)], added + 10), Eviction::At(added + 60, &taints[1]));
        assert_eq!(eviction(&taints, &[for_secs(60)], added + 60), Eviction::Now(&taints[1]));
        assert_eq!(eviction(&taints, &[for_secs(60), forever.clone()], added + 999), Eviction::Never);
        assert_eq!(eviction(&taints, &[forever], added + 999), Eviction::Never);
        assert_eq!(eviction(&taints[..1], &[], added), Eviction::Never);
    }

    #[test]
    fn the_not_ready_taint_follows_the_state_and_keeps_its_time() {
        let user = taint("gpu", "", TaintEffect::NoSchedule);
        let tainted = with_system_taints(std::slice::from_ref(&user), Some("2026-12-01T00:00:05Z"));
        assert_eq!(tainted.len(), 2);
        assert_eq!((tainted[1].key.as_str(), tainted[1].effect), (NOT_READY_TAINT, TaintEffect::NoExecute));
        let again = with_system_taints(&tainted, Some("2026-12-01T00:09:00Z"));
        assert_eq!(again[1].added_at.as_deref(), Some("2026-12-01T00:00:05Z"), "still NotReady: the first time stays");
        assert_eq!(with_system_taints(&again, None), vec![user], "Ready again: only the user's taints remain");
    }

    #[test]
    fn a_sandbox_without_a_not_ready_toleration_gets_the_default_one() {
        let defaulted = with_default_tolerations(&[], 60);
        assert_eq!(defaulted[0].toleration_seconds, Some(60));
        let own = Toleration {
            toleration_seconds: Some(600),
            ..toleration(NOT_READY_TAINT, TolerationOperator::Exists, "", None)
        };
        assert_eq!(with_default_tolerations(std::slice::from_ref(&own), 60).as_ref(), std::slice::from_ref(&own));
        let everything = toleration("", TolerationOperator::Exists, "", None);
        assert_eq!(with_default_tolerations(std::slice::from_ref(&everything), 60).len(), 1, "tolerates all for ever");
        let other = toleration("gpu", TolerationOperator::Exists, "", None);
        assert_eq!(with_default_tolerations(std::slice::from_ref(&other), 60).len(), 2);
    }
}
