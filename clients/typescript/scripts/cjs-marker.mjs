// dist/cjs holds the CommonJS build (for Jest and other require() users): a package.json there
// tells Node and bundlers that its .js files are CommonJS although the package is "type": "module".
import { writeFileSync } from 'node:fs';

writeFileSync(new URL('../dist/cjs/package.json', import.meta.url), '{ "type": "commonjs" }\n');
