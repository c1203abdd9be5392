"""The settings of the `lorafn` command: one typed object, built in main and passed down.

Environment variables use the prefix LORAFN_ and `__` between nested sections, e.g.
LORAFN_DATABASE__URL, LORAFN_OBJECT_STORE__BUCKET, LORAFN_STACK__NATS_PORT. Client commands (adapters,
keys) that are not told where the services are read the endpoints a running `lorafn up` wrote to
`<state_dir>/stack.json`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from lorafn.stack import StackEndpoints, StackPorts
from protocol.settings import NatsSettings, service_settings_config
from storage.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings


class StackSettings(BaseModel):
    """Addresses of the servers `lorafn up` starts."""

    host: str = Field("127.0.0.1", description="address every local server binds to")
    nats_port: int = Field(4222, ge=1, le=65535, description="NATS client port")
    nats_monitor_port: int = Field(8222, ge=1, le=65535, description="NATS monitoring (HTTP) port")
    postgres_port: int = Field(5432, ge=1, le=65535, description="Postgres port")
    s3_port: int = Field(9000, ge=1, le=65527, description="S3 API port (SeaweedFS also uses the next 7)")

    @model_validator(mode="after")
    def _distinct(self) -> StackSettings:
        ports = [self.nats_port, self.nats_monitor_port, self.postgres_port, *self.ports().s3_internal(),
                 self.s3_port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"stack ports must be distinct (S3 takes {self.s3_port}..{self.s3_port + 7}): {ports}")
        return self

    def ports(self) -> StackPorts:
        return StackPorts(
            nats=self.nats_port, nats_monitor=self.nats_monitor_port, postgres=self.postgres_port, s3=self.s3_port
        )


class LorafnSettings(BaseSettings):
    """Everything the `lorafn` command needs."""

    model_config = service_settings_config()

    state_dir: Path = Field(Path(".lorafn"), description="where the local stack keeps its data and secrets")
    stack: StackSettings = Field(default_factory=StackSettings)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    def postgres_connections(self) -> int:
        """The most Postgres connections one `lorafn` command holds (`lorafn init` included): one engine's pool."""
        return self.database.pool_size

    def with_running_stack(self) -> LorafnSettings:
        """Fill the service endpoints that were not set explicitly from a running stack's stack.json."""
        path = self.state_dir / "stack.json"
        if not path.exists():
            return self
        ep = StackEndpoints.read(path)
        update: dict[str, object] = {}
        if "nats" not in self.model_fields_set:
            update["nats"] = NatsSettings(url=ep.nats_admin, stream_replicas=ep.nats_stream_replicas)
        if "database" not in self.model_fields_set:
            update["database"] = DatabaseSettings(url=ep.database_url)
        if "object_store" not in self.model_fields_set:
            update["object_store"] = ObjectStoreSettings(
                endpoint=ep.s3_endpoint, access_key=ep.s3_access_key, secret_key=SecretStr(ep.s3_secret_key),
                bucket=ep.bucket,
            )
        return self.model_copy(update=update)
