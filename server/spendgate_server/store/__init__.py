"""State stores: the interface and its memory and Redis implementations."""

from spendgate_server.store.base import (
    BudgetCheck,
    CancelRequest,
    CancelStatus,
    DecidedCall,
    DedupCheck,
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    SessionKey,
    SessionState,
    SettleOutcome,
    SettleRecord,
    SettleRequest,
    SettleStatus,
    Store,
    ToolCheck,
)

__all__ = [
    "BudgetCheck",
    "CancelRequest",
    "CancelStatus",
    "DecidedCall",
    "DedupCheck",
    "ReserveOutcome",
    "ReserveRequest",
    "ReserveStatus",
    "SessionKey",
    "SessionState",
    "SettleOutcome",
    "SettleRecord",
    "SettleRequest",
    "SettleStatus",
    "Store",
    "ToolCheck",
]
