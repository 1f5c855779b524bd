"""The cloud side: target sessions (verification math) and the verifier service (MQTT glue)."""
