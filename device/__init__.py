"""The device side: draft engine, speculation policy and the agent that talks to the verifier."""
