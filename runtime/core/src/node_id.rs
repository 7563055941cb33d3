//! [`NodeId`]: a node's identity in the cluster map, leases, placement and ownership.
//!
//! It is the node's name, exactly as its certificate names it (the certificate's common name):
//! an authenticated peer is who its certificate says, and every decision about a node (which
//! shards it owns, whether its lease is valid, whether it may vote) is keyed by this one value.
//! A distinct type instead of a bare `String` keeps names apart from every other string (keys,
//! addresses, serials, reasons). The control plane's Raft id is derived from it
//! ([`crate::control::node_id`]). Serialized as a plain string, so the replicated map's JSON and
//! the Raft log are unchanged.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

/// A node's name (its certificate's common name). Derefs to `str`; compares with strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(String);

impl NodeId {
    /// The node called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl Deref for NodeId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Lookups by an owned name (`map.get(&name)` with `name: String`); ordering and hashing are the
/// string's, as `Borrow` requires.
impl Borrow<String> for NodeId {
    fn borrow(&self) -> &String {
        &self.0
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for NodeId {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<&&str> for NodeId {
    fn from(s: &&str) -> Self {
        Self(s.to_string())
    }
}

impl From<&String> for NodeId {
    fn from(s: &String) -> Self {
        Self(s.clone())
    }
}

impl From<&NodeId> for NodeId {
    fn from(s: &NodeId) -> Self {
        s.clone()
    }
}

impl From<NodeId> for String {
    fn from(n: NodeId) -> Self {
        n.0
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for NodeId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<NodeId> for str {
    fn eq(&self, other: &NodeId) -> bool {
        self == other.0
    }
}

impl PartialEq<NodeId> for &str {
    fn eq(&self, other: &NodeId) -> bool {
        *self == other.0
    }
}

impl PartialEq<NodeId> for String {
    fn eq(&self, other: &NodeId) -> bool {
        *self == other.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn serializes_as_its_name_and_looks_up_by_str() {
        let n = NodeId::new("n1");
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"n1\"");
        assert_eq!(serde_json::from_str::<NodeId>("\"n1\"").unwrap(), n);
        let mut m = BTreeMap::new();
        m.insert(n.clone(), 7);
        assert_eq!(m.get("n1"), Some(&7));
        assert_eq!(n, "n1");
        assert_eq!("n1", n);
        assert_eq!(n, *"n1");
        assert_eq!(n.len(), 2);
        assert_eq!(Some(n).as_deref(), Some("n1"));
    }
}
