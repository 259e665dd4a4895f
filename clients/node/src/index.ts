/**
 * spendgate client: ask Decide before every LLM provider call, settle after it.
 *
 * @example
 * import { DecisionClient } from '@spendgate/client';
 *
 * const spendgate = new DecisionClient({ target: '127.0.0.1:50051', failMode: 'open' });
 * const decision = await spendgate.decide({
 *   sessionId: 'my-session', model: 'claude-sonnet-4-5', inputTokens: 2000, maxOutputTokens: 1024, fingerprint,
 * });
 * decision.raiseForBlock(); // TokenCeilingExceeded, SessionBudgetExceeded, ...
 *
 * @module
 */
export {
  ClientStats,
  DEFAULT_TARGET,
  Decision,
  DecisionClient,
  type DecideInput,
  type DecisionClientOptions,
  type FailMode,
  type Logger,
  type SettleInput,
  type Settlement,
  type VerdictKey,
} from './client.js';
export {
  CONFIG_KEYS,
  NANO_PER_USD,
  type EnforcementConfigInput,
  type RuleKey,
  type Usd,
  enforcementConfigToWire,
  usdToNano,
} from './config.js';
export {
  DuplicateRequest,
  EnforcementError,
  InvalidRequest,
  SessionBudgetExceeded,
  SpendgateError,
  SpendgateUnavailable,
  TokenCeilingExceeded,
  ToolCallLimitExceeded,
} from './errors.js';
export type { FieldViolation } from './wire.js';
