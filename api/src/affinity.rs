//! Where a sandbox may run by node labels: `node_selector` (exact matches) and `affinity`
//! (In/NotIn/Exists expressions, required or preferred), with the rules for matching them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How an expression compares a node label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Operator {
    /// The label exists and its value is one of `values`.
    In,
    /// The label is missing, or its value is none of `values`.
    NotIn,
    /// The label exists, whatever its value (`values` must be empty).
    Exists,
}

/// One condition on a node label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Expression {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A preferred expression and how much it counts (1–100).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Preference {
    pub weight: i64,
    #[serde(deserialize_with = "crate::objects_only::one")]
    pub expression: Expression,
}

/// Node affinity: every `required` expression must hold; among the nodes that fit, the one whose
/// matching `preferred` expressions weigh most wins before any resource score.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Affinity {
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::objects_only::list")]
    pub required: Vec<Expression>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::objects_only::list")]
    pub preferred: Vec<Preference>,
}

/// Most expressions in `required` or in `preferred`, and most values in one expression.
pub const MAX_EXPRESSIONS: usize = 32;
pub const MAX_VALUES: usize = 64;

impl Expression {
    /// Whether a node with `labels` satisfies the expression.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
        }
    }
}

/// Whether every `selector` entry is a label of the node with exactly that value.
pub fn selector_matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Affinity {
    /// Whether every required expression holds on a node with `labels`.
    pub fn required_match(&self, labels: &BTreeMap<String, String>) -> bool {
        self.required.iter().all(|e| e.matches(labels))
    }

    /// The summed weight of the preferred expressions that hold on a node with `labels`.
    pub fn preference_weight(&self, labels: &BTreeMap<String, String>) -> u64 {
        self.preferred.iter().filter(|p| p.expression.matches(labels)).map(|p| p.weight.clamp(0, 100) as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, operator: Operator, values: &[&str]) -> Expression {
        Expression { key: key.into(), operator, values: values.iter().map(|v| v.to_string()).collect() }
    }

    #[test]
    fn expressions_follow_kubernetes_node_affinity() {
        let gpu = labels(&[("gpu", "a100"), ("zone", "eu-1")]);
        let plain = labels(&[("zone", "us-1")]);
        let cases = [
            (expr("gpu", Operator::In, &["a100", "h100"]), true, false),
            (expr("gpu", Operator::In, &["h100"]), false, false),
            (expr("gpu", Operator::NotIn, &["a100"]), false, true),
            (expr("zone", Operator::NotIn, &["us-1"]), true, false),
            (expr("gpu", Operator::Exists, &[]), true, false),
            (expr("absent", Operator::NotIn, &["x"]), true, true),
        ];
        for (e, on_gpu, on_plain) in cases {
            assert_eq!((e.matches(&gpu), e.matches(&plain)), (on_gpu, on_plain), "{e:?}");
        }
    }

    #[test]
    fn selectors_need_every_pair_and_affinity_sums_preferred_weights() {
        let node = labels(&[("gpu", "a100"), ("zone", "eu-1")]);
        assert!(selector_matches(&labels(&[]), &node));
        assert!(selector_matches(&labels(&[("gpu", "a100")]), &node));
        assert!(!selector_matches(&labels(&[("gpu", "a100"), ("zone", "us-1")]), &node));
        let affinity = Affinity {
            required: vec![expr("zone", Operator::Exists, &[])],
            preferred: vec![
                Preference { weight: 30, expression: expr("gpu", Operator::In, &["a100"]) },
                Preference { weight: 50, expression: expr("zone", Operator::In, &["us-1"]) },
                Preference { weight: 5, expression: expr("ssd", Operator::NotIn, &["no"]) },
            ],
        };
        assert!(affinity.required_match(&node));
        assert!(!affinity.required_match(&labels(&[("gpu", "a100")])));
        assert_eq!(affinity.preference_weight(&node), 35);
    }
}
