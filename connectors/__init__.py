"""Bus connectors (MQTT, Kafka): the sources and sinks the bridge moves room data to and from."""
