"""Domain errors of storage/. Each carries the numbers and names a caller needs to fix the problem.

The gateway maps them to HTTP status codes; the CLI prints their message. Every adapter refusal is an
`AdapterInvalid` with a stable `code`.
"""

from __future__ import annotations

from typing import Any


class StorageError(Exception):
    """Base of every error raised by storage/."""


class AdapterInvalid(StorageError, ValueError):
    """An uploaded adapter was refused. `code` is stable and machine-readable; `detail` holds the facts."""

    code = "adapter_invalid"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.detail = detail


# Files and archives
class MissingFile(AdapterInvalid):
    """A required file of the adapter is absent."""

    code = "missing_file"


class PickleRefused(AdapterInvalid):
    """A pickle checkpoint (.bin/.pt/.pkl) was sent; only safetensors is accepted."""

    code = "pickle_refused"


class UnexpectedFile(AdapterInvalid):
    """A file other than the adapter's config and weights was sent."""

    code = "unexpected_file"


class UploadLimitExceeded(AdapterInvalid):
    """The upload crosses a size limit (bytes sent or inflated, compression ratio, archive headers, members).

    These are refused while the upload is read, before the bytes over the limit exist; the gateway answers 413.
    """

    code = "upload_limit_exceeded"


class UploadTooLarge(UploadLimitExceeded):
    """The upload, an archive member, or the archive's inflated content exceeds its byte limit."""

    code = "upload_too_large"


class TooManyMembers(UploadLimitExceeded):
    """The archive holds more entries than allowed."""

    code = "too_many_members"


class ArchiveHeaderTooLarge(UploadLimitExceeded):
    """A member name, a tar extended header (pax, GNU long name) or a zip central directory is too large."""

    code = "archive_header_too_large"


class CompressionRatioTooHigh(UploadLimitExceeded):
    """A member or the whole archive inflates to more than the allowed multiple of its compressed size."""

    code = "compression_ratio_too_high"


class ArchiveInvalid(AdapterInvalid):
    """The archive cannot be read, or is neither .tar.gz nor .zip."""

    code = "archive_invalid"


class EmptyArchive(AdapterInvalid):
    """The archive holds no files."""

    code = "empty_archive"


class UnsafeArchiveMember(AdapterInvalid):
    """An archive member has an absolute path, '..', or is a link or device."""

    code = "unsafe_archive_member"


# adapter_config.json
class ConfigInvalid(AdapterInvalid):
    """adapter_config.json is not valid JSON or has a wrong field."""

    code = "config_invalid"


class UnsupportedFeature(AdapterInvalid):
    """The adapter uses a PEFT feature lorafn does not serve (DoRA, modules_to_save, ...)."""

    code = "unsupported_feature"


# adapter_model.safetensors
class SafetensorsInvalid(AdapterInvalid):
    """The safetensors file is truncated or its header is malformed."""

    code = "safetensors_invalid"


class HeaderTooLarge(UploadLimitExceeded):
    """The safetensors header is larger than allowed."""

    code = "header_too_large"


class UnsupportedDtype(AdapterInvalid):
    """A tensor has a dtype other than F16, BF16 or F32."""

    code = "unsupported_dtype"


class UnknownTensorKey(AdapterInvalid):
    """A tensor key does not name a LoRA weight of a supported module."""

    code = "unknown_tensor_key"


class UnsupportedModule(AdapterInvalid):
    """A tensor adapts a module that lorafn does not serve."""

    code = "unsupported_module"


class LayerOutOfRange(AdapterInvalid):
    """A tensor names a layer the backbone does not have."""

    code = "layer_out_of_range"


class MissingLoraPair(AdapterInvalid):
    """A module has lora_A without lora_B, or the reverse."""

    code = "missing_lora_pair"


class ShapeMismatch(AdapterInvalid):
    """A LoRA matrix does not fit the backbone's projection."""

    code = "shape_mismatch"


class InvalidRank(AdapterInvalid):
    """A module's rank is 0, above the maximum, or differs from the config."""

    code = "invalid_rank"


class NonFiniteValues(AdapterInvalid):
    """A tensor holds NaN or infinity."""

    code = "non_finite_values"


class EmptyAdapter(AdapterInvalid):
    """The adapter has no LoRA weights."""

    code = "empty_adapter"


class ObjectCorrupted(StorageError):
    """A blob read from the object store does not hash to its content address."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(
            f"object {key} is corrupted: its bytes hash to sha256 {actual}, expected {expected}; "
            f"re-push the adapter to repair it"
        )
        self.key, self.expected, self.actual = key, expected, actual


class ObjectMissing(StorageError):
    """A blob the registry refers to is not in the object store."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key} is missing from the object store")
        self.key = key


class NotFound(StorageError, LookupError):
    """A tenant, adapter or version that does not exist (or is not visible to the caller)."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} not found")
        self.kind, self.name = kind, name


class AlreadyExists(StorageError):
    """A tenant or key that must be new already exists."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} already exists")
        self.kind, self.name = kind, name


class StorageUnavailable(StorageError):
    """Postgres or the object store cannot be reached right now; the caller may retry later."""

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"{service} is unavailable: {reason}")
        self.service = service
