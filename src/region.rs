//! Contentstack regions and the hosts each one serves (SPEC §1).
//!
//! A route without an explicit `upstream` gets its default from here, so the
//! table must match Contentstack's published host names exactly.

use std::fmt;
use std::str::FromStr;

use crate::route::RouteKind;

/// One of Contentstack's hosting regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Region {
    /// AWS North America, the default.
    #[default]
    Na,
    Eu,
    Au,
    AzureNa,
    AzureEu,
    GcpNa,
    GcpEu,
}

impl Region {
    /// Every region, in the order the SPEC lists them.
    pub const ALL: [Region; 7] = [
        Region::Na,
        Region::Eu,
        Region::Au,
        Region::AzureNa,
        Region::AzureEu,
        Region::GcpNa,
        Region::GcpEu,
    ];

    /// The name used in config files.
    pub fn name(self) -> &'static str {
        match self {
            Region::Na => "na",
            Region::Eu => "eu",
            Region::Au => "au",
            Region::AzureNa => "azure-na",
            Region::AzureEu => "azure-eu",
            Region::GcpNa => "gcp-na",
            Region::GcpEu => "gcp-eu",
        }
    }

    /// The host serving `kind` in this region.
    pub fn host(self, kind: RouteKind) -> String {
        let service = match kind {
            RouteKind::Delivery => "cdn",
            RouteKind::Preview => "rest-preview",
            RouteKind::Graphql => "graphql",
            RouteKind::GraphqlPreview => "graphql-preview",
        };
        match self {
            // NA delivery is the one host on `.io`.
            Region::Na if kind == RouteKind::Delivery => "cdn.contentstack.io".to_owned(),
            Region::Na => format!("{service}.contentstack.com"),
            other => format!("{}-{service}.contentstack.com", other.name()),
        }
    }

    /// The default upstream URL for `kind` in this region.
    pub fn upstream(self, kind: RouteKind) -> String {
        format!("https://{}", self.host(kind))
    }

    /// The Content Management API host of this region.
    pub fn cma_host(self) -> String {
        match self {
            Region::Na => "api.contentstack.io".to_owned(),
            other => format!("{}-api.contentstack.com", other.name()),
        }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error for a region name that Contentstack does not have.
#[derive(Debug, thiserror::Error)]
#[error("unknown region {0:?}: expected one of na, eu, au, azure-na, azure-eu, gcp-na, gcp-eu")]
pub struct UnknownRegion(String);

impl FromStr for Region {
    type Err = UnknownRegion;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Region::ALL
            .into_iter()
            .find(|region| region.name() == name)
            .ok_or_else(|| UnknownRegion(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_contentstack() {
        let hosts = [
            (Region::Na, RouteKind::Delivery, "cdn.contentstack.io"),
            (
                Region::Na,
                RouteKind::Preview,
                "rest-preview.contentstack.com",
            ),
            (Region::Na, RouteKind::Graphql, "graphql.contentstack.com"),
            (
                Region::Na,
                RouteKind::GraphqlPreview,
                "graphql-preview.contentstack.com",
            ),
            (Region::Eu, RouteKind::Delivery, "eu-cdn.contentstack.com"),
            (
                Region::AzureNa,
                RouteKind::Preview,
                "azure-na-rest-preview.contentstack.com",
            ),
            (
                Region::GcpEu,
                RouteKind::GraphqlPreview,
                "gcp-eu-graphql-preview.contentstack.com",
            ),
        ];
        for (region, kind, host) in hosts {
            assert_eq!(region.host(kind), host, "{region:?} {kind:?}");
        }
        assert_eq!(Region::Na.cma_host(), "api.contentstack.io");
        assert_eq!(Region::Au.cma_host(), "au-api.contentstack.com");
    }

    #[test]
    fn names_round_trip() {
        for region in Region::ALL {
            assert_eq!(region.name().parse::<Region>().ok(), Some(region));
        }
        assert!("us".parse::<Region>().is_err());
    }
}
