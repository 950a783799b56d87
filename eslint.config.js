// One lint setup for every package: typescript-eslint's type-aware rules, the ones that matter
// for async services (floating promises, misused promises), and no console in library code.
import js from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
  {
    ignores: [
      "**/dist/**",
      "**/dist-test/**",
      "**/gen/**",
      "node_modules/**",
      ".device-carry/**",
      ".scratch/**",
      "deploy/**",
      "**/*.d.ts",
      "**/fixtures/**",
    ],
  },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    files: ["**/*.ts"],
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      "@typescript-eslint/no-floating-promises": "error",
      "@typescript-eslint/no-misused-promises": "error",
      "@typescript-eslint/consistent-type-imports": "error",
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", ignoreRestSiblings: true }],
      "no-console": "error",
    },
  },
  // node:test's describe/test return promises the runner tracks itself.
  {
    files: ["tests/**", "**/*.test.ts", "**/bench*.ts", "scripts/**"],
    rules: { "no-console": "off", "@typescript-eslint/no-floating-promises": "off" },
  },
  { files: ["**/*.js", "**/*.mjs"], languageOptions: { globals: { process: "readonly", console: "readonly", URL: "readonly" } } },
);
