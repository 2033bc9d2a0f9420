"""Development tooling for this machine: local Kafka broker, demo, replay producer, child-process harness."""
