//! DescribeConfigs, AlterConfigs (whole replacement) and IncrementalAlterConfigs (KIP-339)
//! for topics; broker configs can be described but not changed at run time.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrite_metadata::MetadataRecord;
use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse as IncrementalResourceResponse;
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
};
use kafka_protocol::ResponseError;

use super::str_bytes;
use crate::config::{topic_config_def, ConfigType, TopicConfigDef, TOPIC_CONFIGS};
use crate::controller::{validate_topic_configs, AdminError};
use crate::Broker;

pub const RESOURCE_TOPIC: i8 = 2;
pub const RESOURCE_BROKER: i8 = 4;
pub const SOURCE_TOPIC: i8 = 1;
pub const SOURCE_STATIC_BROKER: i8 = 4;
pub const SOURCE_DEFAULT: i8 = 5;

/// A value of a `*.ms` topic config in the unit of a broker synonym (`log.retention.hours`).
fn in_synonym_unit(synonym: &str, value: String) -> String {
    let per = if synonym.ends_with(".hours") {
        3_600_000
    } else if synonym.ends_with(".minutes") {
        60_000
    } else {
        return value;
    };
    match value.parse::<i64>() {
        Ok(ms) if ms > 0 && ms % per == 0 => (ms / per).to_string(),
        _ => value,
    }
}

/// One topic config as DescribeConfigs reports it: value and source (topic override, a
/// broker setting given at start-up, or the default), with Kafka's synonyms (v1+) and the
/// documentation (v3+), which says when Ferrite gives the config no effect yet.
fn topic_config_entry(
    broker: &Broker,
    def: &TopicConfigDef,
    topic_value: Option<&String>,
    include_synonyms: bool,
    include_documentation: bool,
) -> DescribeConfigsResourceResult {
    let config = &broker.config;
    let static_broker: Vec<(&str, &String)> = def
        .broker_synonyms
        .iter()
        .filter_map(|s| config.explicit.get(*s).map(|v| (*s, v)))
        .collect();
    let (value, source) = match topic_value {
        Some(v) => (Some(v.clone()), SOURCE_TOPIC),
        None if !static_broker.is_empty() => {
            (config.topic_config_default(def.name), SOURCE_STATIC_BROKER)
        }
        None => (config.topic_config_default(def.name), SOURCE_DEFAULT),
    };
    let mut entry = DescribeConfigsResourceResult::default()
        .with_name(str_bytes(def.name))
        .with_value(value.map(str_bytes))
        .with_config_source(source)
        .with_config_type(def.config_type as i8);
    if include_synonyms {
        let mut synonyms = Vec::new();
        if let Some(v) = topic_value {
            synonyms.push(
                DescribeConfigsSynonym::default()
                    .with_name(str_bytes(def.name))
                    .with_value(Some(str_bytes(v.as_str())))
                    .with_source(SOURCE_TOPIC),
            );
        }
        for (name, v) in &static_broker {
            synonyms.push(
                DescribeConfigsSynonym::default()
                    .with_name(str_bytes(*name))
                    .with_value(Some(str_bytes(v.as_str())))
                    .with_source(SOURCE_STATIC_BROKER),
            );
        }
        // The built-in default, under the broker config that carries it (Kafka lists
        // the lowest-precedence synonym, e.g. log.retention.hours=168); a config with no
        // broker synonym has none.
        if let Some(name) = def.broker_synonyms.last().copied() {
            let builtin = crate::config::BrokerConfig::default().topic_config_default(def.name);
            synonyms.push(
                DescribeConfigsSynonym::default()
                    .with_name(str_bytes(name))
                    .with_value(builtin.map(|v| str_bytes(in_synonym_unit(name, v))))
                    .with_source(SOURCE_DEFAULT),
            );
        }
        entry = entry.with_synonyms(synonyms);
    }
    if include_documentation {
        let doc = match def.no_effect {
            None => def.doc.to_string(),
            Some(why) => format!(
                "{} [Ferrite: accepted and validated, but no effect in Ferrite yet: {why}.]",
                def.doc
            ),
        };
        entry = entry.with_documentation(Some(str_bytes(doc)));
    }
    entry
}

pub fn describe(
    broker: &Arc<Broker>,
    req: DescribeConfigsRequest,
    _version: i16,
) -> DescribeConfigsResponse {
    let image = broker.controller.image();
    let results = req
        .resources
        .into_iter()
        .map(|r| {
            let name = r.resource_name.to_string();
            let result = DescribeConfigsResult::default()
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone());
            let keys_wanted = |k: &str| {
                r.configuration_keys
                    .as_ref()
                    .is_none_or(|ks| ks.iter().any(|w| w.as_str() == k))
            };
            match r.resource_type {
                RESOURCE_TOPIC => {
                    let Some(topic) = image.topic(&name) else {
                        return result
                            .with_error_code(ResponseError::UnknownTopicOrPartition.code())
                            .with_error_message(Some(str_bytes(format!(
                                "topic `{name}` does not exist"
                            ))));
                    };
                    let configs = TOPIC_CONFIGS
                        .iter()
                        .filter(|d| keys_wanted(d.name))
                        .map(|d| {
                            topic_config_entry(
                                broker,
                                d,
                                topic.configs.get(d.name),
                                req.include_synonyms,
                                req.include_documentation,
                            )
                        })
                        .collect();
                    result.with_configs(configs)
                }
                RESOURCE_BROKER => {
                    if name != broker.config.node_id.to_string() && !name.is_empty() {
                        return result
                            .with_error_code(ResponseError::InvalidRequest.code())
                            .with_error_message(Some(str_bytes(format!(
                                "this is broker {}",
                                broker.config.node_id
                            ))));
                    }
                    let c = &broker.config;
                    let pairs = [
                        ("node.id", c.node_id.to_string()),
                        ("broker.rack", c.rack.clone().unwrap_or_default()),
                        ("log.dirs", c.data_dir.display().to_string()),
                        (
                            "auto.create.topics.enable",
                            c.auto_create_topics_enable.to_string(),
                        ),
                        ("num.partitions", c.num_partitions.to_string()),
                        (
                            "default.replication.factor",
                            c.default_replication_factor.to_string(),
                        ),
                        ("socket.request.max.bytes", c.request_bytes_max.to_string()),
                        (
                            "log.retention.check.interval.ms",
                            c.retention_check_interval_ms.to_string(),
                        ),
                        (
                            "log.segment.bytes",
                            c.log_defaults.segment_bytes.to_string(),
                        ),
                        ("log.retention.ms", c.log_defaults.retention_ms.to_string()),
                        (
                            "log.retention.bytes",
                            c.log_defaults.retention_bytes.to_string(),
                        ),
                        (
                            "message.max.bytes",
                            c.log_defaults.max_message_bytes.to_string(),
                        ),
                        ("fetch.zero.copy.enable", c.fetch_zero_copy.to_string()),
                        (
                            "producer.id.expiration.ms",
                            c.log_defaults.producer_id_expiration_ms.to_string(),
                        ),
                    ];
                    let configs = pairs
                        .into_iter()
                        .filter(|(k, _)| keys_wanted(k))
                        .map(|(k, v)| {
                            DescribeConfigsResourceResult::default()
                                .with_name(str_bytes(k))
                                .with_value(Some(str_bytes(v)))
                                .with_read_only(true)
                                .with_config_source(SOURCE_STATIC_BROKER)
                        })
                        .collect();
                    result.with_configs(configs)
                }
                other => result
                    .with_error_code(ResponseError::InvalidRequest.code())
                    .with_error_message(Some(str_bytes(format!(
                        "resource type {other} has no configs here"
                    )))),
            }
        })
        .collect();
    DescribeConfigsResponse::default().with_results(results)
}

/// Validates the new full set of topic configs and commits the difference.
async fn replace_topic_configs(
    broker: &Arc<Broker>,
    topic: &str,
    validate_only: bool,
    build: impl FnOnce(&BTreeMap<String, String>) -> Result<Vec<(String, Option<String>)>, AdminError>,
) -> Result<(), AdminError> {
    let mut writer = broker.controller.writer().await;
    let image = writer.image();
    let t = image.topic(topic).ok_or_else(|| {
        AdminError::new(
            ResponseError::UnknownTopicOrPartition,
            format!("topic `{topic}` does not exist"),
        )
    })?;
    let wanted = validate_topic_configs(&broker.config, build(&t.configs)?)?;
    let mut records = Vec::new();
    for key in t.configs.keys().filter(|k| !wanted.contains_key(*k)) {
        records.push(MetadataRecord::TopicConfig {
            topic_id: t.topic_id,
            key: key.clone(),
            value: None,
        });
    }
    for (key, value) in &wanted {
        if t.configs.get(key) != Some(value) {
            records.push(MetadataRecord::TopicConfig {
                topic_id: t.topic_id,
                key: key.clone(),
                value: Some(value.clone()),
            });
        }
    }
    if validate_only || records.is_empty() {
        return Ok(());
    }
    let next = writer.commit(records).await.map_err(|e| AdminError {
        code: crate::error::quorum_error_code(&e),
        message: e.to_string(),
    })?;
    broker
        .replicas
        .reconcile(&next, &broker.config, true)
        .map_err(|e| AdminError::new(ResponseError::KafkaStorageError, e.to_string()))?;
    tracing::info!(topic, configs = ?wanted, "altered topic configs");
    Ok(())
}

fn broker_configs_read_only() -> AdminError {
    AdminError::new(
        ResponseError::InvalidRequest,
        "broker configs cannot be changed at run time; restart with --set",
    )
}

pub async fn alter(broker: &Arc<Broker>, req: AlterConfigsRequest) -> AlterConfigsResponse {
    let mut responses = Vec::with_capacity(req.resources.len());
    for r in req.resources {
        let name = r.resource_name.to_string();
        let outcome = match r.resource_type {
            RESOURCE_TOPIC => {
                let given: Vec<(String, Option<String>)> = r
                    .configs
                    .iter()
                    .map(|c| (c.name.to_string(), c.value.as_ref().map(|v| v.to_string())))
                    .collect();
                replace_topic_configs(broker, &name, req.validate_only, |_| Ok(given)).await
            }
            RESOURCE_BROKER => Err(broker_configs_read_only()),
            other => Err(AdminError::new(
                ResponseError::InvalidRequest,
                format!("resource type {other} has no configs"),
            )),
        };
        let mut resp = AlterConfigsResourceResponse::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name);
        if let Err(e) = outcome {
            resp = resp
                .with_error_code(e.code)
                .with_error_message(Some(str_bytes(e.message)));
        }
        responses.push(resp);
    }
    AlterConfigsResponse::default().with_responses(responses)
}

pub async fn incremental_alter(
    broker: &Arc<Broker>,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    const SET: i8 = 0;
    const DELETE: i8 = 1;
    const APPEND: i8 = 2;
    const SUBTRACT: i8 = 3;
    let mut responses = Vec::with_capacity(req.resources.len());
    for r in req.resources {
        let name = r.resource_name.to_string();
        let ops: Vec<(i8, String, Option<String>)> = r
            .configs
            .iter()
            .map(|c| {
                (
                    c.config_operation,
                    c.name.to_string(),
                    c.value.as_ref().map(|v| v.to_string()),
                )
            })
            .collect();
        let outcome = match r.resource_type {
            RESOURCE_TOPIC => {
                replace_topic_configs(broker, &name, req.validate_only, |current| {
                    let mut next: BTreeMap<String, String> = current.clone();
                    for (op, key, value) in ops {
                        match op {
                            SET => {
                                let v = value.ok_or_else(|| {
                                    AdminError::new(
                                        ResponseError::InvalidConfig,
                                        format!("SET of `{key}` needs a value"),
                                    )
                                })?;
                                next.insert(key, v);
                            }
                            DELETE => {
                                next.remove(&key);
                            }
                            APPEND | SUBTRACT => {
                                if topic_config_def(&key).map(|d| d.config_type)
                                    != Some(ConfigType::List)
                                {
                                    return Err(AdminError::new(
                                        ResponseError::InvalidConfig,
                                        format!("`{key}` is not a list config"),
                                    ));
                                }
                                // Kafka's AppendOnly/Subtract: on the current value, or
                                // the default when the topic does not override it.
                                let current = next
                                    .get(&key)
                                    .cloned()
                                    .or_else(|| broker.config.topic_config_default(&key))
                                    .unwrap_or_default();
                                let mut items: Vec<String> = current
                                    .split(',')
                                    .map(|i| i.trim().to_string())
                                    .filter(|i| !i.is_empty())
                                    .collect();
                                let given = value.unwrap_or_default();
                                let given =
                                    given.split(',').map(str::trim).filter(|i| !i.is_empty());
                                if op == APPEND {
                                    for g in given {
                                        if !items.iter().any(|i| i == g) {
                                            items.push(g.to_string());
                                        }
                                    }
                                } else {
                                    let drop: Vec<&str> = given.collect();
                                    items.retain(|i| !drop.contains(&i.as_str()));
                                }
                                next.insert(key, items.join(","));
                            }
                            other => {
                                return Err(AdminError::new(
                                    ResponseError::InvalidRequest,
                                    format!("unknown config operation {other}"),
                                ))
                            }
                        }
                    }
                    Ok(next.into_iter().map(|(k, v)| (k, Some(v))).collect())
                })
                .await
            }
            RESOURCE_BROKER => Err(broker_configs_read_only()),
            other => Err(AdminError::new(
                ResponseError::InvalidRequest,
                format!("resource type {other} has no configs"),
            )),
        };
        let mut resp = IncrementalResourceResponse::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name);
        if let Err(e) = outcome {
            resp = resp
                .with_error_code(e.code)
                .with_error_message(Some(str_bytes(e.message)));
        }
        responses.push(resp);
    }
    IncrementalAlterConfigsResponse::default().with_responses(responses)
}
