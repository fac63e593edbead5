//! NetManager's local API: HTTP/1.1 with JSON bodies over a unix socket
//! (docs/contract.md, NetManager local API). NodeEngine is the client,
//! NetManager the server; both use these types, so the wire format is
//! written once. Field names are upstream's.

use serde::{Deserialize, Serialize};

/// Routes of the API.
pub mod routes {
    pub const REGISTER: &str = "/register";
    pub const CONTAINER_DEPLOY: &str = "/container/deploy";
    pub const CONTAINER_UNDEPLOY: &str = "/container/undeploy";
    /// Upstream's older name for [`CONTAINER_UNDEPLOY`].
    pub const DOCKER_UNDEPLOY: &str = "/docker/undeploy";
    pub const UNIKERNEL_DEPLOY: &str = "/unikernel/deploy";
    pub const UNIKERNEL_UNDEPLOY: &str = "/unikernel/undeploy";
    /// Ours: the dataplane and deployments, for `NetManager status`.
    pub const STATUS: &str = "/status";
}

/// `POST /register`: the node id NodeEngine got from the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub client_id: String,
    /// Empty: use NetManager's configured `ClusterUrl`.
    #[serde(default)]
    pub cluster_address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterAnswer {
    pub client_id: String,
}

/// `POST /container/deploy` and `POST /unikernel/deploy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRequest {
    /// The container's process (its network namespace); 0 for unikernels.
    #[serde(default)]
    pub pid: u32,
    /// The job name, `app.appns.service.servicens`.
    #[serde(rename = "serviceName")]
    pub service_name: String,
    #[serde(rename = "instanceNumber")]
    pub instance_number: u32,
    /// `hostPort:containerPort[/tcp|/udp];...`
    #[serde(rename = "portMappings", default)]
    pub port_mappings: String,
}

/// The addresses a deployment got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployAnswer {
    #[serde(rename = "serviceName", default)]
    pub service_name: String,
    #[serde(rename = "nsAddress", default)]
    pub ns_address: String,
    #[serde(rename = "nsAddressv6", default)]
    pub ns_address_v6: String,
}

/// `POST /container/undeploy` (and its aliases).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndeployRequest {
    #[serde(rename = "serviceName")]
    pub service_name: String,
    #[serde(rename = "instanceNumber")]
    pub instance_number: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndeployAnswer {
    #[serde(rename = "serviceName")]
    pub service_name: String,
    #[serde(rename = "instanceNumber")]
    pub instance_number: u32,
    /// False when NetManager did not know the instance (nothing to undo).
    pub undeployed: bool,
}

/// Body of every answer that is not a success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deploy_request_wire_names() {
        let r = DeployRequest {
            pid: 42,
            service_name: "a.b.c.d".into(),
            instance_number: 1,
            port_mappings: "80:80".into(),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"pid": 42, "serviceName": "a.b.c.d", "instanceNumber": 1, "portMappings": "80:80"})
        );
        let minimal: DeployRequest =
            serde_json::from_value(json!({"serviceName": "a.b.c.d", "instanceNumber": 0})).unwrap();
        assert_eq!((minimal.pid, minimal.port_mappings.as_str()), (0, ""));
    }

    #[test]
    fn answers_tolerate_missing_fields() {
        let a: DeployAnswer = serde_json::from_value(json!({"nsAddress": "10.18.0.2"})).unwrap();
        assert_eq!(a.ns_address, "10.18.0.2");
        assert_eq!(a.ns_address_v6, "");
    }
}
