// ESM entry (`import { withIsrgate } from '@isrgate/next'`, e.g. in next.config.mjs): the same
// function as the CommonJS entry.
import cjs from './index.js';

export const withIsrgate = cjs.withIsrgate;
export default withIsrgate;
