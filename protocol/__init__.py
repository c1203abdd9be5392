"""The wire contract of lorafn: NATS subjects, stream definitions, messages and error codes."""
