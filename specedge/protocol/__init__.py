"""The protocol both sides speak, a leaf of the package: it imports nothing from device/, cloud/
or the harness. `topics` builds and parses every MQTT topic (docs/protocol.md, docs/fleet.md)."""
