// The user-facing `enforcementConfig` (the same keys as the server's config and the
// Python client's), checked on the way in and turned into the wire message.
import type { EnforcementConfig, RuleName } from './wire.js';

/** The user-facing name of a rule: its config key. */
export type RuleKey = 'token_ceiling' | 'max_session_usd' | 'dedup_ttl_seconds' | 'max_tool_calls' | 'model_downgrade';

/** An amount of US dollars: a number or a decimal string (`"0.004"`), converted exactly. */
export type Usd = number | string;

/**
 * Client-side limits for a call. They only tighten the server's config: the stricter
 * value wins key by key. A missing or null key leaves the rule as the server has it.
 */
export interface EnforcementConfigInput {
  token_ceiling?: number | bigint | null;
  max_session_usd?: Usd | null;
  budget_mode?: 'crossing' | 'strict' | null;
  dedup_ttl_seconds?: number | bigint | null;
  max_tool_calls?: number | bigint | null;
  model_downgrade?: { threshold_usd: Usd; fallback: string } | null;
  /** `true`: every rule in shadow mode; a list: only those rules. */
  shadow?: boolean | readonly RuleKey[] | null;
}

export const NANO_PER_USD = 1_000_000_000n;

/** Wire enum name ↔ config key of each rule. */
export const RULE_KEYS: Readonly<Record<Exclude<RuleName, 'RULE_UNSPECIFIED'>, RuleKey>> = {
  RULE_TOKEN_CEILING: 'token_ceiling',
  RULE_SESSION_BUDGET: 'max_session_usd',
  RULE_DUPLICATE_REQUEST: 'dedup_ttl_seconds',
  RULE_TOOL_CALL_LIMIT: 'max_tool_calls',
  RULE_MODEL_DOWNGRADE: 'model_downgrade',
};
const RULE_NAMES = Object.fromEntries(Object.entries(RULE_KEYS).map(([name, key]) => [key, name])) as Record<
  RuleKey,
  RuleName
>;

/** Every accepted key of EnforcementConfigInput. */
export const CONFIG_KEYS: readonly string[] = [...Object.values(RULE_KEYS), 'budget_mode', 'shadow'];
const INT_KEYS = ['token_ceiling', 'dedup_ttl_seconds', 'max_tool_calls'] as const;
const BUDGET_MODES = { crossing: 'BUDGET_MODE_CROSSING', strict: 'BUDGET_MODE_STRICT' } as const;

const DECIMAL = /^(\d*)(?:\.(\d*))?(?:e([+-]?\d+))?$/i;

/**
 * US dollars to integer nano-USD, rounded up (a limit is never loosened by rounding).
 *
 * Parsed as a decimal string, so `0.1` is exactly 100_000_000 nano-USD, not a float's neighbour.
 */
export function usdToNano(key: string, value: unknown): bigint {
  const text = typeof value === 'number' && Number.isFinite(value) ? String(value) : value;
  const match = typeof text === 'string' ? DECIMAL.exec(text.trim()) : null;
  if (match === null || `${match[1]}${match[2] ?? ''}` === '') {
    throw new TypeError(
      `enforcementConfig[${JSON.stringify(key)}] must be a non-negative number of US dollars, got ${JSON.stringify(value) ?? String(value)}`,
    );
  }
  const [, whole = '', fraction = '', exponent = '0'] = match;
  const digits = BigInt(`${whole}${fraction}` || '0');
  const shift = Number(exponent) - fraction.length + 9; // power of ten from digits to nano-USD
  if (shift > 30) {
    throw new RangeError(`enforcementConfig[${JSON.stringify(key)}] is out of range: ${String(value)}`);
  }
  if (-shift > whole.length + fraction.length) {
    return digits === 0n ? 0n : 1n; // below one nano-USD: rounds up to one
  }
  if (shift >= 0) {
    return digits * 10n ** BigInt(shift);
  }
  const divisor = 10n ** BigInt(-shift);
  return (digits + divisor - 1n) / divisor;
}

function intValue(key: string, value: unknown): string {
  if (typeof value === 'bigint' || (typeof value === 'number' && Number.isSafeInteger(value))) {
    return String(value);
  }
  throw new TypeError(`enforcementConfig[${JSON.stringify(key)}] must be an integer, got ${JSON.stringify(value)}`);
}

/**
 * Check the keys and types of `config` and build the wire message.
 *
 * @throws TypeError naming the unknown key or the key with a wrong type. Range checks
 *   are the server's (it answers INVALID_ARGUMENT naming the field).
 */
export function enforcementConfigToWire(config: EnforcementConfigInput): EnforcementConfig {
  if (typeof config !== 'object' || config === null || Array.isArray(config)) {
    throw new TypeError(`enforcementConfig must be an object, got ${JSON.stringify(config)}`);
  }
  const message: EnforcementConfig = {};
  for (const [key, value] of Object.entries(config) as [string, unknown][]) {
    if (!CONFIG_KEYS.includes(key)) {
      throw new TypeError(`enforcementConfig has unknown key ${JSON.stringify(key)}; accepted keys: ${CONFIG_KEYS.join(', ')}`);
    }
    if (value === null || value === undefined) {
      continue;
    }
    if ((INT_KEYS as readonly string[]).includes(key)) {
      message[key as (typeof INT_KEYS)[number]] = intValue(key, value);
    } else if (key === 'max_session_usd') {
      message.max_session_nano_usd = usdToNano(key, value).toString();
    } else if (key === 'budget_mode') {
      if (value !== 'crossing' && value !== 'strict') {
        throw new TypeError(`enforcementConfig["budget_mode"] must be "crossing" or "strict", got ${JSON.stringify(value)}`);
      }
      message.budget_mode = BUDGET_MODES[value];
    } else if (key === 'model_downgrade') {
      const downgrade = value as Record<string, unknown>;
      const keys = typeof value === 'object' ? Object.keys(downgrade).sort().join(',') : '';
      if (keys !== 'fallback,threshold_usd') {
        throw new TypeError('enforcementConfig["model_downgrade"] must be an object with exactly "threshold_usd" and "fallback"');
      }
      if (typeof downgrade['fallback'] !== 'string' || downgrade['fallback'] === '') {
        throw new TypeError('enforcementConfig["model_downgrade"]["fallback"] must be a model name');
      }
      message.model_downgrade = {
        threshold_nano_usd: usdToNano('model_downgrade.threshold_usd', downgrade['threshold_usd']).toString(),
        fallback_model: downgrade['fallback'],
      };
    } else if (value === true) {
      message.shadow = true;
    } else if (Array.isArray(value) && value.every((rule) => Object.hasOwn(RULE_NAMES, rule))) {
      message.shadow_rules = value.map((rule: RuleKey) => RULE_NAMES[rule]);
    } else if (value !== false) {
      throw new TypeError(`enforcementConfig["shadow"] must be true, false or a list of: ${Object.values(RULE_KEYS).join(', ')}`);
    }
  }
  return message;
}
