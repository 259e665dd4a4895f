// Errors of the spendgate client; every one derives from SpendgateError.
import type { FieldViolation } from './wire.js';

/** Root of every error the spendgate client raises. */
export class SpendgateError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/**
 * The call was blocked by a rule; it never reached the provider.
 *
 * `rule` is the config key of the rule that fired (`"token_ceiling"` …), `reason`
 * says why in words a developer can act on, `decisionId` is the server's id of the
 * decision, for logs and support.
 */
export class EnforcementError extends SpendgateError {
  /** The rule a subclass stands for. */
  static readonly RULE: string = 'unknown';

  readonly rule: string;
  readonly reason: string;
  readonly decisionId: string;

  constructor(reason: string, decisionId: string, rule?: string | null) {
    const fired = rule ?? (new.target as typeof EnforcementError).RULE;
    super(`${fired}: ${reason} (decision ${decisionId})`);
    this.rule = fired;
    this.reason = reason;
    this.decisionId = decisionId;
  }
}

/** The request's input tokens exceed `token_ceiling`. */
export class TokenCeilingExceeded extends EnforcementError {
  static override readonly RULE = 'token_ceiling';
}

/** The session's `max_session_usd` is used up. */
export class SessionBudgetExceeded extends EnforcementError {
  static override readonly RULE = 'max_session_usd';
}

/** An identical request was admitted within `dedup_ttl_seconds`. */
export class DuplicateRequest extends EnforcementError {
  static override readonly RULE = 'dedup_ttl_seconds';
}

/** The session's tool-call count would exceed `max_tool_calls`. */
export class ToolCallLimitExceeded extends EnforcementError {
  static override readonly RULE = 'max_tool_calls';
}

/** The decision service could not be reached in time and `failMode` is `"closed"`. */
export class SpendgateUnavailable extends SpendgateError {}

/** The service refused the request as malformed (a bug in the caller, not an outage). */
export class InvalidRequest extends SpendgateError {
  /** The fields the server named, with what is wrong with each. */
  readonly fieldViolations: readonly FieldViolation[];

  constructor(message: string, fieldViolations: readonly FieldViolation[] = [], options?: ErrorOptions) {
    super(message, options);
    this.fieldViolations = fieldViolations;
  }
}

/** The typed error for a blocking rule, by config key. */
export const BLOCK_ERRORS: Readonly<Record<string, typeof EnforcementError>> = {
  token_ceiling: TokenCeilingExceeded,
  max_session_usd: SessionBudgetExceeded,
  dedup_ttl_seconds: DuplicateRequest,
  max_tool_calls: ToolCallLimitExceeded,
};
