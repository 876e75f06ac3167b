// Validates an AsyncAPI document with the official parser and prints every
// diagnostic; exits 1 when the parser reports an error (or no document).
// Usage: node validate.mjs asyncapi.json
import { readFileSync } from 'node:fs';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';

const path = process.argv[2];
if (!path) {
  console.error('usage: node validate.mjs <asyncapi.json>');
  process.exit(2);
}
const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(path, 'utf8'));
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
for (const d of diagnostics) {
  const level = ['error', 'warning', 'info', 'hint'][d.severity] ?? d.severity;
  console.log(`${level}: ${d.code}: ${d.message} at /${d.path.join('/')}`);
}
if (!document || errors.length > 0) {
  console.error(`${errors.length} error(s): the document is not valid AsyncAPI`);
  process.exit(1);
}
const channels = document.channels().length;
const operations = document.operations().length;
const messages = document.components().messages().length;
console.log(`valid AsyncAPI ${document.version()}: ${channels} channels, ${operations} operations, ${messages} messages`);
