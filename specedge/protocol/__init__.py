"""The protocol both sides speak, a leaf of the package: it imports nothing from device/, cloud/
or the harness (tests/test_layout.py).

  wire      the binary messages of a round: one Struct per body, a type -> codec table
  contract  what a draft and a target must share (tokenizer, vocabulary, chat template)
  topics    every MQTT topic, built and parsed
  announce  the fleet's retained target announcement
  desired   desired configs and commands: merge, digest, which keys are live
"""
